"""Behaviour kept: the job reproduces, row for row, the output recorded on the demo corpus before
the redesign (issue 30) for the four tiny families on HF, and the vLLM engine reproduces the HF
recording for the default (LLaVA-1.5) and Qwen3-VL (images of several sizes, each pruned to a
third; its DeepStack rows and M-RoPE positions reach vLLM's LLM): answers, errors, kept indices,
token counts, FLOPs and KV bytes (times excluded). One Ray instance for all the runs.
Recordings are per machine class (CPU vendor and vector width: tests/golden/record.py says why);
a class without one is recorded once from the landed code. Re-record only for an intended change:
`python -m tests.golden.record`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from .conftest import REPO
from .golden.record import CASES, RECORDED, case_name, machine_class, recording, recordings_dir, run_case, write_demo_corpus

RECORDINGS = recordings_dir()
# Without a recording for this machine class there is nothing exact to compare with: say so,
# loudly, rather than compare with another class's floats.
needs_recording = pytest.mark.skipif(
    RECORDINGS is None, reason=f"no golden recording for machine class {machine_class()}: record one from the "
    "landed code (python -m tests.golden.record) and commit it",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("golden") / "corpus"
    write_demo_corpus(path)
    ray.init(address="local", num_cpus=3, include_dashboard=False)
    yield path
    ray.shutdown()


@needs_recording
@pytest.mark.parametrize(("config", "engine"), CASES, ids=[case_name(*c) for c in CASES])
def test_output_matches_the_recording(config: str, engine: str, corpus: Path, tmp_path: Path) -> None:
    expected = json.loads(recording(config).read_text())
    got = json.loads(json.dumps(run_case(REPO, config, engine, corpus, tmp_path / "out")))  # JSON's own types
    assert sorted(got) == sorted(expected)
    changed = [i for i in expected if got[i] != expected[i]]
    first = changed[0] if changed else None
    assert not changed, (
        f"{len(changed)} of {len(expected)} rows differ; first {first}: "
        f"{ {k: (expected[first][k], got[first][k]) for k in expected[first] if expected[first][k] != got[first][k]} }"
    )


@needs_recording
@pytest.mark.parametrize("config", RECORDED)
def test_the_recordings_cover_what_they_guard(config: str) -> None:
    """No row failed; pruning cut every image; the Qwen configs mix image sizes."""
    rows = list(json.loads(recording(config).read_text()).values())
    assert len(rows) == 48 and not any(r["error"] for r in rows)
    assert all(0 < r["visual_tokens_kept"] == len(r["kept_indices"]) < r["visual_tokens_in"] for r in rows)
    if "qwen" in config:
        assert len({r["visual_tokens_in"] for r in rows}) > 1
