"""Smoke runs of every benchmark module (``pipeline/bench/*.py``) on tiny inputs, as subprocesses
with a hard timeout: each must exit 0 and end with ``RESULT {json}`` holding its keys with
positive figures. Figures are not checked against targets (benchmarks print those).

``pipeline.bench.gpu`` is left out: it needs a GPU. A new benchmark module fails
``test_every_bench_module_has_a_smoke_test`` until it gets a smoke test here.

The engine benchmark runs hf, and vLLM too when a vLLM environment is usable
(``engine_environment``). When vLLM is expected ($RESPRUNE_VLLM_PYTHON set, or the repository's
``.venv-vllm`` built, as ``make test`` does) but unusable, ``test_engine_bench_vllm`` fails;
when it is neither expected nor usable, that test is skipped with the reason (``-ra`` lists it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NOT_SMOKED = {"gpu": "needs a GPU"}
SMOKED = {"select", "prefill", "pipeline", "engine", "feed", "draft", "tasks", "inputs"}  # each has a test below


def run_bench(module: str, *args: str, timeout: int) -> dict[str, Any]:
    """``python -m pipeline.bench.<module> ARGS``; its RESULT json. On timeout it gets SIGINT first
    (its finally blocks stop Ray and the engine workers), then its process group is killed."""
    cmd = [sys.executable, "-m", f"pipeline.bench.{module}", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[1:])} did not finish within {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd[1:])} exited {proc.returncode}\n{out[-3000:]}\n{err[-5000:]}"
    lines = out.strip().splitlines()
    assert lines and lines[-1].startswith("RESULT {"), f"last line is not RESULT {{json}}:\n{out[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def positive(result: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = result[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, (key, value)


def test_every_bench_module_has_a_smoke_test() -> None:
    modules = {p.stem for p in (REPO / "pipeline" / "bench").glob("*.py")} - {"__init__"}
    assert modules - set(NOT_SMOKED) == SMOKED


def test_select_bench() -> None:
    r = run_bench("select", "--sizes", "2:144:256:32", "--repeats", "1", "--device", "cpu", timeout=120)
    positive(r, "ratio_B2_N144_K32", "adaptive_over_select_B2_N144_K32", "reference_agreement")
    assert r["device"] == "cpu"


def test_inputs_bench() -> None:
    r = run_bench("inputs", "--local", "50,200", "--s3", "20,60", "--ledger", "2000,8000", "--runs", "4", timeout=180)
    for kind, sizes in (("local", ("50", "200")), ("s3", ("20", "60"))):
        assert set(r["seconds"][kind]) == set(sizes) and all(v > 0 for v in r["seconds"][kind].values())
    assert set(r["seconds"]["ledger"]) == {"2000", "8000"}
    assert all(v > 0 for f in r["seconds"]["ledger"].values() for v in f.values())
    assert set(r["extrapolated_10M_s"]) == {"list_local", "list_s3_moto", "ledger"} and r["runs"] == 4


def test_prefill_bench() -> None:
    r = run_bench("prefill", "--model-path", "tiny:llava", "--repeats", "1", timeout=180)
    positive(r, "text_tokens", "llm_to_vision_flops_ratio", "reference_llm_to_vision_flops_ratio",
             "encode_ms_1_image", "speedup_128", "flops_ratio_128")
    assert set(r["prefill_ms"]) == {"576", "192", "128", "64"}
    assert all(v > 0 for v in r["prefill_ms"].values())
    assert isinstance(r["target_pass"], bool)


def test_pipeline_bench() -> None:
    # 3 files of 2 rows per kind: the steady window (first arrival to last) needs more than one batch.
    # Two lengths, as the benchmark's vqa and caption kinds (at its defaults: 8 and 32).
    r = run_bench("pipeline", "--rows", "6", "--batch-size", "2", "--model-path", "tiny:llava",
                  "--vqa-tokens", "2", "--caption-tokens", "3", "--no-warmup", "--timeout", "240", timeout=600)
    assert r["rows"] == 6 and r["engines_run"] == ["hf"] and r["notes"] == []
    assert r["new_tokens"] == {"vqa": 2, "caption": 3}
    names = ["hf_vqa_pruned", "hf_vqa_keep_all", "hf_caption_pruned", "hf_caption_keep_all"]
    assert [(c["name"], c["engine"], c["max_new_tokens"]) for c in r["configs"]] == [
        (n, "hf", 2 if "vqa" in n else 3) for n in names]
    for kind in ("vqa", "caption"):
        positive(r, *(f"hf_{kind}_{k}" for k in (
            "pruned_images_per_s", "keep_all_images_per_s", "pruned_over_keep_all", "slowest_stage_images_per_s",
            "pipeline_over_slowest_stage", "keep_all_pipeline_over_slowest_stage")))
        assert set(r[f"hf_{kind}_targets_pass"]) == {"pruned_over_keep_all", "pipeline_over_slowest_stage"}
    assert r["hf_vqa_pruned_images_per_s"] == r["pruned_images_per_s"]  # unprefixed keys are hf's vqa
    for name in names:
        assert set(r["stage_images_per_s"][name]) == {"text", "prepare", "encode", "decode"}
        assert all(v > 0 for v in r["stage_images_per_s"][name].values())
        assert r["end_to_end_images_per_s"][name] > 0
        assert 0 < r["mean_generated_tokens"][name] <= (2 if "vqa" in name else 3)
    assert set(r["targets_pass"]) == {"pruned_over_keep_all", "pipeline_over_slowest_stage"}


def test_tasks_bench() -> None:
    # --smoke: 3 images of tiny:llava on hf, one a batch: the four tasks as a spec, as four rows per
    # image, and as a spec of the rows' free-text questions (text); no prefix cache, so no shared way.
    r = run_bench("tasks", "--smoke", timeout=420)
    assert r["images"] == 3 and r["engine"] == "hf" and r["tasks"] == ["caption", "colour", "count", "object"]
    positive(r, "llava_encode_once_over_per_row", "llava_flops_per_row_over_encode_once",
             "llava_encode_once_over_per_row_same_decode", "llava_flops_per_row_over_encode_once_same_decode",
             "llava_gpu_estimate_encode_once_over_per_row", "llava_gpu_estimate_flops_per_row_over_encode_once")
    assert set(r["runs"]) == {"llava_spec_prefix_off", "llava_rows_prefix_off", "llava_text_prefix_off"}
    spec, rows, text = (r["runs"][f"llava_{w}_prefix_off"] for w in ("spec", "rows", "text"))
    # CPU-seconds per image are counted in the window from the second output block to the last: none
    # when a run's output came in fewer than 3 blocks (3 images may), and 0 when its last blocks came
    # together (no CPU tick between them). The ratio is there exactly when both runs measured some.
    cpu_ratio = r["llava_cpu_s_per_row_over_encode_once"]
    measured = [run["cpu_s_per_image"] for run in (spec, rows)]
    if all(isinstance(c, float) and c > 0 for c in measured):
        positive(r, "llava_cpu_s_per_row_over_encode_once")
    else:
        assert cpu_ratio is None, (cpu_ratio, measured, spec["batches"], rows["batches"])
    # Encode once: one vision encode per image against four, and the vision FLOPs with them.
    assert spec["vision_encodes_per_image"] == text["vision_encodes_per_image"] == 1
    assert rows["vision_encodes_per_image"] == 4
    assert rows["flops_vision_per_image"] == pytest.approx(4 * spec["flops_vision_per_image"])
    assert spec["rows"] == text["rows"] == 3 and rows["rows"] == 12
    # text asks the rows' questions at the rows' length: the same prefill, fewer vision FLOPs.
    assert text["max_new_tokens"] == rows["max_new_tokens"] > 0
    assert text["flops_prefill_per_image"] == rows["flops_prefill_per_image"]
    # Constrained answers all parse (the JSON one fits its max_new_tokens), so every task is counted.
    assert spec["task_errors"] == {"caption": 0, "colour": 0, "count": 0, "object": 0}
    assert r["llava_flops_per_row_over_encode_once"] > 1
    # Both 7B estimates are there and price encoding once as a saving (4 tasks).
    assert r["gpu_estimate"]["llava"]["flops_per_row_over_encode_once"] > 1
    assert r["llava_prefix_caching_on_over_off_spec"] is None  # hf: no prefix cache, no on/off runs
    assert r["notes"] == []


def test_feed_bench(tmp_path: Path) -> None:
    # Every family at its cluster config's settings, from the committed checkpoint JSON (no weights).
    table = tmp_path / "cpu_prepare.yaml"
    r = run_bench("feed", "--sizes", "96x72", "--repeats", "1", "--write-table", str(table), timeout=240)
    families = {"llava", "llava_next", "qwen2_5_vl", "qwen3_vl", "qwen3_5"}  # found through configs/*.yaml
    for key in ("prepare_ms", "gpu_actor_host_ms_before", "gpu_actor_host_ms_after", "gpu_ms_estimate",
                "cores_per_gpu", "images_per_second_per_gpu", "device_work_ms_on_cpu", "target_met"):
        assert r[key].keys() == families and all(v.keys() == {"96x72"} for v in r[key].values()), key
    for f in families:
        cell = {key: v[f]["96x72"] for key, v in r.items() if isinstance(v, dict) and isinstance(v.get(f), dict)}
        for key in ("prepare_ms", "gpu_actor_host_ms_before", "gpu_actor_host_ms_after", "gpu_ms_estimate",
                    "cores_per_gpu", "decode_ms", "resize_ms", "serialise_ms"):
            assert isinstance(cell[key], float) and cell[key] > 0, (f, key, cell[key])
        assert isinstance(cell["target_met"], bool)
        # uint8 at the model's input size against the processor's float32 (Qwen's also repeats every
        # pixel over its 2 temporal frames): at least 4x, whatever the machine's speed.
        assert cell["prepared_bytes"] - 1024 <= cell["float32_bytes"] / 4, (f, cell)  # - the npz headers
        assert cell["output_identical"] is True, f
        assert 0 < cell["keep"] < cell["visual_tokens"], f
    assert r["keep"]["llava"]["96x72"] == 128 and r["keep"]["llava_next"]["96x72"] == 640  # the configs' budgets
    assert r["target_sizes"] == ["640x480", "1280x960"] and r["target_pass"] is None  # no target size was run
    assert r["jpeg_bytes"]["96x72"] > 0 and r["threads"] == 1 and r["date"] and r["machine"]

    written = yaml.safe_load(table.read_text())
    assert written.keys() == {"measured", "prepare_ms"}
    measured = written["measured"]
    assert measured.keys() == {"date", "machine", "command", "jpeg_draft_margin"}
    assert measured["date"] == r["date"] and measured["jpeg_draft_margin"] == 2.0
    assert measured["command"].startswith("python -m pipeline.bench.feed ") and "--write-table" in measured["command"]
    assert written["prepare_ms"].keys() == families
    for f in families:
        assert written["prepare_ms"][f] == pytest.approx({"96x72": r["prepare_ms"][f]["96x72"]}, abs=0.051)


def test_draft_bench() -> None:
    r = run_bench("draft", "--scenes", "2", "--sides", "1344:1600", "--repeats", "1", timeout=300)
    assert r["scenes"] == 2
    # At 1344+ px a side, LLaVA's 336 px input is a 1/2 DCT scale away even at margin 2.
    assert r["tiny-llava-shapes_m2_engaged"] == r["tiny-llava-shapes_m1_engaged"] == 2
    positive(r, "tiny-llava-shapes_m2_mean_abs_levels", "tiny-llava-shapes_m2_min_psnr_db",
             "tiny-llava-shapes_m2_decode_speedup", "tiny-llava-shapes_m2_speedup", "llava-1.5-7b_m1_mean_abs_norm",
             "qwen3-vl-8b-448_m1_speedup", "llava-v1.6-7b_m1_jpeg_mean_abs_levels")
    for tag in ("full", "m2", "m1"):
        assert (r[f"accuracy_{tag}"] is None or 0 <= r[f"accuracy_{tag}"] <= 1) and r[f"errors_{tag}"] == 0
    assert r["answers_m2_differ"] in (0, 1, 2) and r["answers_m1_differ"] in (0, 1, 2)


# ---------------------------------------------------------------- the engine benchmark


@pytest.fixture(scope="module")
def vllm_environment() -> tuple[Any, bool, str]:
    """(the vLLM EngineEnvironment or None, whether vLLM is expected here, why it is unusable)."""
    from pipeline.config import ConfigError, DecodeStageConfig
    from pipeline.engines import engine_environment
    from pipeline.engines.environment import VLLM_PYTHON_ENV, VLLM_VENV

    expected = bool(os.environ.get(VLLM_PYTHON_ENV)) or (VLLM_VENV / "bin" / "python").exists()
    try:
        return engine_environment(DecodeStageConfig(engine="vllm")), expected, ""
    except ConfigError as e:
        return None, expected, str(e)


@pytest.fixture(scope="module")
def engine_bench(vllm_environment: tuple[Any, bool, str]) -> dict[str, Any]:
    """One run of the engine benchmark: hf, and vLLM when its environment is usable."""
    env, _, _ = vllm_environment
    engines = "hf,vllm" if env else "hf"
    # vLLM's start-up alone takes 1-2 minutes on 2 busy cores.
    return run_bench("engine", "--model", "tiny:llava", "--images", "3", "--vqa-tokens", "2", "--caption-tokens", "3",
                     "--engines", engines, "--timeout", "420" if env else "180", timeout=600 if env else 240)


LENGTHS = {"vqa": 2, "caption": 3}  # the smoke run's max new tokens per kind


def test_engine_bench_hf(engine_bench: dict[str, Any]) -> None:
    r = engine_bench
    assert r["images"] == 3 and r["new_tokens"] == LENGTHS and r["visual_tokens"] == 576 and r["keep"] == 128
    positive(r, "hf_startup_s")
    for kind, n in LENGTHS.items():
        positive(r, f"hf_keep_all_{kind}", f"hf_pruned_{kind}", f"hf_pruned_over_hf_keep_all_{kind}")
        for budget in ("keep_all", "pruned"):
            assert 0 < r["mean_generated_tokens"][f"hf_{budget}_{kind}"] <= n
        # Every key of the contract is there, null for an engine not run.
        for key in (f"vllm_keep_all_{kind}", f"vllm_pruned_{kind}", f"vllm_pruned_over_vllm_keep_all_{kind}",
                    f"hf_over_vllm_keep_all_{kind}", f"hf_over_vllm_pruned_{kind}",
                    f"target_vllm_pruned_2x_keep_all_{kind}"):
            assert key in r
    assert "vllm_startup_s" in r
    assert not [n for n in r["notes"] if n.startswith("hf")]


def test_engine_bench_vllm(vllm_environment: tuple[Any, bool, str], request: pytest.FixtureRequest) -> None:
    env, expected, why = vllm_environment
    if env is None:
        if expected:
            pytest.fail(f"vLLM is expected here ($RESPRUNE_VLLM_PYTHON set or .venv-vllm built) but unusable: {why}")
        pytest.skip(f"NO vLLM ENVIRONMENT: the engine benchmark smoke ran hf only ({why})")
    r = request.getfixturevalue("engine_bench")
    assert r["engines_run"] == ["hf", "vllm"] and r["notes"] == [], r["notes"]
    positive(r, "vllm_startup_s")
    for kind, n in LENGTHS.items():
        positive(r, f"vllm_keep_all_{kind}", f"vllm_pruned_{kind}", f"vllm_pruned_over_vllm_keep_all_{kind}",
                 f"hf_over_vllm_keep_all_{kind}", f"hf_over_vllm_pruned_{kind}")
        assert isinstance(r[f"target_vllm_pruned_2x_keep_all_{kind}"], bool)
        assert 0 < r["mean_generated_tokens"][f"vllm_pruned_{kind}"] <= n
    assert r["engines"]["vllm"]["python"] == env.python
