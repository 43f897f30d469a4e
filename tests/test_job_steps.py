"""The job's steps apart from Ray: prepare (pipeline.plan) and the report's manifest contract
(pipeline.report). run_job's whole path under Ray is tests/test_job.py and tests/test_golden.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.io.manifest import write_manifest
from pipeline.tiny.shapes_world import write_corpus
from pipeline.io.storage import locate
from pipeline.plan import prepare
from pipeline.report import JobSummary

from .conftest import REPO


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("steps") / "corpus"
    write_corpus(path, rows=6)
    return path


def _cfg(corpus: Path, out: Path, **overrides: object):  # noqa: ANN202
    return load_config(REPO / "configs/local.yaml", {"input.path": str(corpus), "output.path": str(out), **overrides})


def test_prepare_resolves_everything_once_without_ray(corpus: Path, tmp_path: Path) -> None:
    plan = prepare(_cfg(corpus, tmp_path / "out", **{"pruning.alpha": None}))
    assert plan.cfg.model.family == "llava" and plan.cfg.pruning.alpha == 0.75  # the family's paper alpha, filled in
    assert (plan.inputs.rows, plan.inputs.expected_rows, len(plan.inputs.files)) == (6, 6, 2)
    assert plan.engine.engine == "hf" and plan.previous is None and plan.incremental is None
    assert plan.output.uri == str(tmp_path / "out") and plan.checkpoint.uri == f"{tmp_path / 'out'}/_checkpoint"
    assert plan.model.uri == "tiny:llava-shapes" and Path(plan.model_path, "config.json").exists()
    assert plan.costs.kv_bytes_per_element == 4  # float32 on CPU
    # The identity is the run as configured (taken before the family and alpha were filled in).
    assert plan.identity["model"]["family"] == "auto" and plan.identity["pruning"]["alpha"] is None
    base = plan.manifest_base({"attempt": 1, "started_at": "t"}, {"python": "3"})
    assert base["model"]["family"] == "llava" and base["input"] == {"format": "parquet", "files": 2, "rows": 6, "dropped": {}}
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()


def test_prepare_fails_fast_naming_the_field(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"input.path .* does not exist"):
        prepare(_cfg(tmp_path / "nowhere", tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"model.path 'tiny:no-such-recipe'"):
        prepare(_cfg(corpus, tmp_path / "out", **{"model.path": "tiny:no-such-recipe"}))


def test_prepare_checks_the_output_against_its_mode(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = prepare(_cfg(corpus, out))
    write_manifest(locate(str(out)), {"status": "failed", "run_identity": first.identity, "attempts": [{"attempt": 1}]})
    with pytest.raises(ConfigError, match="already holds files and output.mode is 'error'"):
        prepare(_cfg(corpus, out, **{"output.mode": "error"}))
    resumed = prepare(_cfg(corpus, out, **{"output.mode": "resume"}))
    assert resumed.previous["attempts"] == [{"attempt": 1}]
    with pytest.raises(ConfigError, match=r"cannot resume .*pruning.keep: 128 then, 64 now"):
        prepare(_cfg(corpus, out, **{"output.mode": "resume", "pruning.keep": 64}))
    with pytest.raises(ConfigError, match=r"cannot resume .*input.jpeg_draft_margin: 2.0 then, None now"):
        prepare(_cfg(corpus, out, **{"output.mode": "resume", "input.jpeg_draft_margin": None}))


def test_the_manifest_sections_come_from_the_summary_fields() -> None:
    summary = JobSummary(input_rows=5, expected_rows=4, output_rows=4, ok_rows=3, error_rows=1,
                         errors_by_kind={"corrupt image": 1}, dropped={"repeated id": 1}, truncated_prompts=2,
                         mean_visual_tokens_kept=64.0)
    sections = summary.manifest_sections()
    assert sections["rows"] == {
        "input": 5, "expected": 4, "output": 4, "ok": 3, "error": 1, "errors_by_kind": {"corrupt image": 1},
        "dropped": {"repeated id": 1}, "skipped_already_done": 0, "written_this_attempt": 0, "missing_ids": 0,
        "duplicate_ids": 0, "truncated_prompts": 2,
    }
    assert sections["visual_tokens"] == {"mean_in": 0.0, "mean_kept": 64.0, "kept": {}, "energy_explained": {}}
    assert sections["stages"] == {"busy_seconds": {}, "bound_by": None}
    assert set(sections) == {"rows", "visual_tokens", "stages"}
    json.dumps(summary.as_dict())  # the CLI prints it as JSON


def test_core_modules_import_without_ray() -> None:
    code = ("import sys; import pipeline.pruning, pipeline.models, pipeline.cost.accounting, pipeline.cost.planner, "
            "pipeline.plan, pipeline.report; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout
