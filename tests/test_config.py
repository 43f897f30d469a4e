"""Config validation fails fast and names the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, DecodeStageConfig, load_config, validate_config
from pipeline.engines import engine_names, engine_spec
from pipeline.job import check_resources, run_job

REPO = Path(__file__).resolve().parents[1]
BASE = {"input": {"path": "in"}, "output": {"path": "out"}, "model": {"path": "tiny:llava"}}


TABLES = {"prices.yaml", "accelerators.yaml", "cpu_prepare.yaml"}  # data tables, validated by their own loaders


def test_shipped_configs_validate() -> None:
    jobs = [p for p in sorted((REPO / "configs").glob("*.yaml")) if p.name not in TABLES]
    assert {"local.yaml", "llava-1.5-7b.yaml", "local-llava-next.yaml", "local-qwen2_5_vl.yaml", "llava-next-7b.yaml",
            "qwen2.5-vl-7b.yaml", "local-qwen3_vl.yaml", "qwen3-vl-8b.yaml",
            "local-qwen3_5.yaml", "qwen3.5-9b.yaml"} <= {p.name for p in jobs}
    for path in jobs:
        load_config(path)


def test_overrides_apply() -> None:
    cfg = load_config(REPO / "configs/local.yaml", {"pruning.keep": 64, "pruning.method": "divprune", "input.path": "/x"})
    assert (cfg.pruning.keep, cfg.pruning.method, cfg.input.path) == (64, "divprune", "/x")


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"pruning": {"keep": 0}}, "pruning.keep"),
        ({"pruning": {"method": "fastv"}}, "pruning.method"),
        ({"pruning": {"alpha": -1}}, "pruning.alpha"),
        ({"encode_stage": {"num_gpus": -1}}, "encode_stage.num_gpus"),
        ({"decode_stage": {"pool_size": 2, "max_pool_size": 1}}, "decode_stage"),
        ({"generation": {"max_new_tokens": 0}}, "generation.max_new_tokens"),
        ({"model": {"path": "x", "dtype": "float8"}}, "model.dtype"),
        ({"pruning": {"kepp": 3}}, "pruning.kepp"),
        ({"pruning": {"prune_ratio": 1.0}}, "pruning.prune_ratio"),
        ({"pruning": {"keep": 64, "prune_ratio": 0.5}}, "pruning: .*keep and prune_ratio both set"),
        ({"model": {"path": "x", "min_pixels": 10_000, "max_pixels": 5_000}}, "model: .*min_pixels"),
        ({"model": {"path": "x", "family": "qwen2"}}, "model.family"),
        ({"input": {"path": ["a", "b"]}}, "input: .*path: a list of prefixes is read with format: files only"),
        ({"input": {"path": "a", "format": "tar"}}, "input.format"),
        ({"input": {"path": "a", "format": "files", "image_column": "k"}}, "input: .*image_column: .*parquet only"),
        ({"input": {"path": "a", "image_root": "r"}}, "input: .*image_root: .*set image_column"),
        ({"input": {"path": "a", "extensions": []}}, "input.extensions"),
        ({"input": {"path": "a", "prompt": "Describe.", "format": "files"}, "tasks": [{"name": "c", "prompt": "Hi"}]},
         "input.prompt: a task spec gives every row its prompts"),
    ],
)
def test_bad_fields_are_named(patch: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"{field}"):
        validate_config({**BASE, **patch})


def test_budget_is_a_count_or_a_ratio_and_the_command_line_replaces_the_files() -> None:
    assert validate_config(BASE).pruning.keep == 128  # neither given: the documented default count
    ratio = validate_config({**BASE, "pruning": {"prune_ratio": 0.778}}).pruning
    assert (ratio.keep, ratio.prune_ratio, ratio.keep_for(2880), ratio.keep_for(576)) == (None, 0.778, 640, 128)
    assert ratio.describe() == "prune 77.8 %"
    count = validate_config({**BASE, "pruning": {"keep": 640}}).pruning
    assert (count.keep_for(2880), count.keep_for(300), count.describe()) == (640, 300, "keep 640")
    # A budget given as an override replaces the file's budget of the other kind instead of clashing.
    qwen = load_config(REPO / "configs/local-qwen2_5_vl.yaml", {"pruning.keep": 64})
    assert (qwen.pruning.keep, qwen.pruning.prune_ratio) == (64, None)
    local = load_config(REPO / "configs/local.yaml", {"pruning.prune_ratio": 0.889})
    assert (local.pruning.keep, local.pruning.keep_for(576)) == (None, 64)
    # alpha: null means the family's paper setting.
    assert (qwen.pruning.alpha, qwen.pruning.alpha_for(0.3), local.pruning.alpha_for(0.3)) == (None, 0.3, 0.75)


def test_the_engine_registry_drives_the_engine_field() -> None:
    """decode_stage.engine takes exactly the registered engines, documents each with its registry
    summary, and an unknown one is named with the field and every registered engine."""
    for name in engine_names():
        assert validate_config({**BASE, "decode_stage": {"engine": name}}).decode_stage.engine == name
    described = DecodeStageConfig.model_fields["engine"].description
    assert all(f"`{name}`: {engine_spec(name).summary}" in described for name in engine_names())
    *rest, last = [repr(name) for name in engine_names()]
    listed = f"{', '.join(rest)} or {last}" if rest else last  # as pydantic lists a Literal's values
    with pytest.raises(ConfigError, match=f"decode_stage.engine: Input should be {listed}$"):
        validate_config({**BASE, "decode_stage": {"engine": "vLLM"}})  # names are case-sensitive


def test_missing_section_is_named() -> None:
    with pytest.raises(ConfigError, match="model: Field required"):
        validate_config({"input": {"path": "a"}, "output": {"path": "b"}})


def test_local_config_fits_two_cpus_and_oversized_requests_fail_fast() -> None:
    local = load_config(REPO / "configs/local.yaml")
    check_resources(local, {"CPU": 2.0})  # the embedded default fits this machine
    # The pools that deadlocked here: three 1-CPU pools plus a read task on 2 CPUs.
    greedy = validate_config({**BASE, "text_stage": {"num_cpus": 1}, "encode_stage": {"num_cpus": 1}, "decode_stage": {"num_cpus": 1}})
    with pytest.raises(ConfigError, match=r"need 3.5 CPUs .*text_stage.pool_size\*num_cpus=1.*prepare_stage.pool_size\*num_cpus=0.25.*cluster has 2"):
        check_resources(greedy, {"CPU": 2.0})
    gpu = load_config(REPO / "configs/llava-1.5-7b.yaml")
    with pytest.raises(ConfigError, match=r"need 1 GPUs \(encode_stage.num_gpus=0.25, decode_stage.num_gpus=0.75\).*has 0"):
        check_resources(gpu, {"CPU": 64.0})
    check_resources(gpu, {"CPU": 64.0, "GPU": 1.0})
    # A resume adds Ray Data's checkpoint filter actor (1 CPU): the local default asks Ray for 3.
    with pytest.raises(ConfigError, match=r"need 2.75 CPUs .*checkpoint filter actor 1\) but the cluster has 2"):
        check_resources(local, {"CPU": 2.0}, checkpoint_filter=True)
    check_resources(local, {"CPU": float(local.ray.num_cpus)}, checkpoint_filter=True)


def test_existing_output_fails_fast_unless_overwrite(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-0.parquet").write_bytes(b"x")
    cfg = validate_config({**BASE, "output": {"path": str(tmp_path / "out")}})
    with pytest.raises(ConfigError, match=r"output.path .* already holds files and output.mode is 'error'.*--resume"):
        run_job(cfg)  # raises before Ray starts or any row is read
    # Files without a manifest are not a run of this job: nothing to resume.
    resume = validate_config({**BASE, "output": {"path": str(tmp_path / "out"), "mode": "resume"}})
    with pytest.raises(ConfigError, match=r"holds files but no _manifest.json"):
        run_job(resume)


def test_reliability_fields_are_validated() -> None:
    cfg = validate_config({**BASE, "input": {"path": "a", "id_policy": "drop_duplicates", "long_prompt": "truncate",
                                             "max_prompt_tokens": 512}, "output": {"path": "b", "mode": "resume"},
                           "decode_stage": {"max_batch_tokens": 4096}, "storage": {"retry_attempts": 3}})
    assert (cfg.input.id_policy, cfg.output.mode, cfg.decode_stage.max_batch_tokens) == ("drop_duplicates", "resume", 4096)
    for section, field, value in (("input", "id_policy", "keep_all"), ("output", "mode", "append"),
                                  ("input", "long_prompt", "cut"), ("storage", "retry_attempts", 0)):
        raw = {**BASE, "input": {"path": "a"}, "output": {"path": "b"}}
        raw[section] = {**raw.get(section, {}), field: value}
        with pytest.raises(ConfigError, match=rf"{section}.{field}: "):
            validate_config(raw)


def test_bad_model_path_fails_fast_naming_the_field(tmp_path: Path) -> None:
    from pipeline.tiny.shapes_world import write_corpus

    write_corpus(tmp_path / "in", rows=2, shards=1)
    cfg = validate_config({**BASE, "input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "o")},
                           "model": {"path": str(tmp_path / "no-such-checkpoint")}})
    with pytest.raises(ConfigError, match=r"model.path '.*no-such-checkpoint'"):
        run_job(cfg)


def test_input_without_required_columns_fails_fast(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a"], "picture": [b"x"]}), tmp_path / "in" / "p.parquet")
    cfg = validate_config({**BASE, "input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "o")}})
    with pytest.raises(ConfigError, match=r"p.parquet: lacks required column 'image'"):
        run_job(cfg)
