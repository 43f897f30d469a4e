"""Behaviour kept: the job reproduces, row for row, the output recorded on the demo corpus before
the redesign (issue 30) for the four tiny families on HF and the default on vLLM: answers,
errors, kept indices, token counts, FLOPs and KV bytes (times excluded). One Ray instance for
all five runs. Re-record only for an intended change: `python -m tests.golden.record`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from .conftest import REPO
from .golden.record import CASES, HERE, case_name, run_case, write_demo_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("golden") / "corpus"
    write_demo_corpus(path)
    ray.init(address="local", num_cpus=3, include_dashboard=False)
    yield path
    ray.shutdown()


@pytest.mark.parametrize(("config", "engine"), CASES, ids=[case_name(*c) for c in CASES])
def test_output_matches_the_recording(config: str, engine: str, corpus: Path, tmp_path: Path) -> None:
    expected = json.loads((HERE / f"{case_name(config, engine)}.json").read_text())
    got = json.loads(json.dumps(run_case(REPO, config, engine, corpus, tmp_path / "out")))  # JSON's own types
    assert sorted(got) == sorted(expected)
    changed = [i for i in expected if got[i] != expected[i]]
    first = changed[0] if changed else None
    assert not changed, (
        f"{len(changed)} of {len(expected)} rows differ; first {first}: "
        f"{ {k: (expected[first][k], got[first][k]) for k in expected[first] if expected[first][k] != got[first][k]} }"
    )
