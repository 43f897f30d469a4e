"""pipeline/cost/cpu_side.py and the job's preparation-pool warning (pipeline/plan.py): the CPU
table's loader and interpolation, cores per GPU and the CPU's images/s, what a config's
preparation pool gives each GPU, and the warning when it cannot feed the GPU pools. Fast: no
Ray, no weights (the 7B configs' checkpoints are their config.json files)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, JobConfig, load_config
from pipeline.cost import cpu_side
from pipeline.models import detect_family
from pipeline.plan import check_prepare_pool, cost_model, prepare_pool_warning

from .conftest import REPO

SEVEN_B = ("llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b", "qwen3-vl-8b", "qwen3.5-9b")
TABLE = {
    "measured": {"date": "2026-12-01", "machine": "test box, 4 cores", "command": "written by hand",
                 "jpeg_draft_margin": None},
    "prepare_ms": {"llava": {"640x480": 10.0, "1280x960": 30.0, "4000x3000": 100.0},
                   "qwen2_5_vl": {"640x480": 20.0, "480x640": 24.0, "1280x960": 40.0}},
}


def _table(tmp_path: Path, table: dict, name: str = "cpu.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(table))
    return path


def _with(cfg: JobConfig, **prepare: object) -> JobConfig:
    return cfg.model_copy(update={"prepare_stage": cfg.prepare_stage.model_copy(update=prepare)})


def test_prepare_ms_exact_interpolated_and_clamped(tmp_path: Path) -> None:
    table = cpu_side.load_cpu_table(_table(tmp_path, TABLE))
    assert table.source() == "measured 2026-12-01 on test box, 4 cores, full decode"
    ms = cpu_side.prepare_ms
    assert ms(table, "llava", 1280, 960) == 30.0  # measured: as measured
    # Linear in the pixel count between the two nearest measured sizes: 896x600 is 537,600 pixels, 0.25 of
    # the way from 307,200 to 1,228,800.
    assert ms(table, "llava", 896, 600) == pytest.approx(10 + 0.25 * (30 - 10))
    assert ms(table, "llava", 600, 896) == pytest.approx(15.0)  # the pixel count decides, not the orientation
    p0, p1 = 1280 * 960, 4000 * 3000
    assert ms(table, "llava", 3000, 2000) == pytest.approx(30 + (3000 * 2000 - p0) / (p1 - p0) * 70)
    assert ms(table, "llava", 100, 100) == 10.0 and ms(table, "llava", 8000, 8000) == 100.0  # clamped at the ends
    # Two sizes of one pixel count: each exact when asked for, their mean in between.
    assert (ms(table, "qwen2_5_vl", 640, 480), ms(table, "qwen2_5_vl", 480, 640)) == (20.0, 24.0)
    assert ms(table, "qwen2_5_vl", 320, 240) == 22.0
    assert ms(table, "qwen2_5_vl", 896, 600) == pytest.approx(22 + 0.25 * (40 - 22))
    with pytest.raises(KeyError):
        ms(table, "llava_next", 640, 480)
    assert cpu_side.sizes(table, "llava") == ["640x480", "1280x960", "4000x3000"]
    assert cpu_side.reference_size(table, "llava") == "1280x960"


def test_cores_per_gpu_and_cpu_rate() -> None:
    assert cpu_side.cores_per_gpu(25.0, 60.0) == pytest.approx(1.5)  # 25 ms x 60 img/s = 1.5 core-seconds a second
    assert cpu_side.cpu_images_per_second(25.0, 1.5) == pytest.approx(60.0)
    assert cpu_side.cpu_images_per_second(25.0, 1.0) == pytest.approx(40.0)


def test_what_a_config_gives_each_gpu() -> None:
    cfg = load_config(REPO / "configs/llava-1.5-7b.yaml")
    assert cpu_side.gpus_at_full_size(cfg) == 16  # 16 x 0.25 (encode) + 16 x 0.75 (decode)
    assert cpu_side.prepare_cores_per_gpu(_with(cfg, num_cpus=1.0, max_pool_size=24)) == pytest.approx(1.5)
    # One thread per actor: two CPUs reserved prepare no faster than one; a quarter is a quarter of a core.
    assert cpu_side.prepare_cores(_with(cfg, num_cpus=2.0, max_pool_size=24)) == 24
    assert cpu_side.prepare_cores(_with(cfg, num_cpus=0.25, max_pool_size=24)) == 6
    assert cpu_side.prepare_cores(_with(cfg, num_cpus=1.0, pool_size=3, max_pool_size=None)) == 3  # a fixed pool
    assert cpu_side.prepare_cores_per_gpu(load_config(REPO / "configs/local.yaml")) is None  # no GPU pools


@pytest.mark.parametrize(("mutate", "where"), [
    (lambda t: t["prepare_ms"]["llava"].update({"1280x960": -1.0}), "llava.1280x960"),
    (lambda t: t["prepare_ms"]["llava"].update({"1280by960": 5.0}), "llava.1280by960"),
    (lambda t: t["prepare_ms"]["llava"].update({"640x480": "fast"}), "prepare_ms.llava.640x480"),
    (lambda t: t["prepare_ms"].update({"llava15": {"640x480": 5.0}}), "llava15"),
    (lambda t: t["prepare_ms"].update({"llava": {}}), "llava: no measured size"),
    (lambda t: t["measured"].pop("date"), "measured.date"),
    (lambda t: t["measured"].update({"cpu": "x"}), "measured.cpu"),
])
def test_a_bad_table_names_the_field(tmp_path: Path, mutate, where: str) -> None:
    import copy

    table = copy.deepcopy(TABLE)
    mutate(table)
    with pytest.raises(ConfigError, match="--cpu-table") as e:
        cpu_side.load_cpu_table(_table(tmp_path, table))
    assert where in str(e.value)


def test_prepare_pool_warning_fires_only_when_the_pool_cannot_feed_the_gpus() -> None:
    cfg = load_config(REPO / "configs/llava-1.5-7b.yaml")
    sized = _with(cfg, num_cpus=1.0, max_pool_size=24)  # 1.5 cores per GPU: 60 images/s of 25 ms
    assert prepare_pool_warning(sized, size="1280x960", prepare_ms=25.0, gpu_images_per_second=60.0) is None
    message = prepare_pool_warning(sized, size="1280x960", prepare_ms=25.0, gpu_images_per_second=61.0)
    assert message is not None
    assert "prepare_stage cannot feed the GPU pools" in message and "16 GPUs" in message and "60 images/s" in message
    assert "1.52 cores per GPU" in message and "max_pool_size 25" in message  # 25 ms x 61 / 1000, x 16 GPUs
    # Fractional CPUs count as fractions of a core, more than one as one: 24 actors at 2 CPUs feed as at 1.
    assert prepare_pool_warning(_with(cfg, num_cpus=2.0, max_pool_size=24), size="s", prepare_ms=25.0,
                                gpu_images_per_second=60.0) is None
    assert prepare_pool_warning(_with(cfg, num_cpus=0.5, max_pool_size=24), size="s", prepare_ms=25.0,
                                gpu_images_per_second=60.0) is not None
    # A CPU-only run has no GPU to feed, however slow its preparation.
    local = load_config(REPO / "configs/local.yaml")
    assert prepare_pool_warning(local, size="s", prepare_ms=1e6, gpu_images_per_second=1e6) is None


def _resolved(name: str) -> tuple[JobConfig, str]:
    """A 7B config with its family filled in (as the job's prepare does) and its checkpoint's configs."""
    cfg = load_config(REPO / f"configs/{name}.yaml")
    arch = str(REPO / cfg.model.architecture)
    model = cfg.model.model_copy(update={"family": detect_family(arch)})
    return cfg.model_copy(update={"model": model}), arch


@pytest.mark.parametrize("name", SEVEN_B)
def test_the_7b_configs_feed_their_gpus_and_the_default_pool_does_not(name: str) -> None:
    """The job's check as prepare() runs it, on the shipped tables: each 7B config's prepare_stage is
    sized from configs/cpu_prepare.yaml (no warning); the default pool (2 actors x 0.25 CPU) is not."""
    cfg, arch = _resolved(name)
    assert check_prepare_pool(cfg, arch, cost_model(cfg, arch)) is None
    default = cfg.model_copy(update={"prepare_stage": JobConfig.model_fields["prepare_stage"].default})
    message = check_prepare_pool(default, arch, cost_model(default, arch))
    assert message is not None and "at 1280x960" in message and "configs/cpu_prepare.yaml, measured" in message


def test_the_jobs_plan_warns_and_records_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """prepare() (the job's first step, no Ray) on the local config moved onto GPU pools: the tiny model
    takes far more images/s than 2 actors x 0.25 CPU prepare, so the plan warns, in the log and in the
    manifest's fields; the same config on CPU does not."""
    from pipeline.plan import prepare
    from pipeline.tiny.shapes_world import write_corpus

    write_corpus(tmp_path / "in", rows=2, shards=1)
    base = {"input.path": str(tmp_path / "in"), "output.path": str(tmp_path / "out")}
    on_cpu = prepare(load_config(REPO / "configs/local.yaml", base))
    assert on_cpu.warnings == ()
    gpus = {"encode_stage.num_gpus": 0.25, "decode_stage.num_gpus": 0.75, "cost.accelerator": "h100-sxm"}
    with caplog.at_level("WARNING", logger="pipeline.plan"):
        plan = prepare(load_config(REPO / "configs/local.yaml", base | gpus))
    [warning] = plan.warnings
    assert warning.startswith("prepare_stage cannot feed the GPU pools") and "at 1280x960" in warning
    assert warning in caplog.text
    manifest = plan.manifest_base({"attempt": 1, "started_at": "now"}, {})
    assert manifest["warnings"] == [warning]


def test_the_shipped_table_covers_every_family() -> None:
    from pipeline.models import ADAPTERS

    table = cpu_side.load_cpu_table()
    assert set(table.prepare_ms) == set(ADAPTERS)
    assert all(cpu_side.reference_size(table, f) == "1280x960" for f in ADAPTERS)  # what the configs are sized at
