"""Where checkpoints come from (pipeline.models.sources): builds and copies land whole or not at
all, however many actors on a node start at once. The S3 copy end to end is in
tests/test_job.py::test_job_reads_and_writes_s3."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pipeline.models.sources import materialize, resolve_model_path


def test_concurrent_builders_leave_one_complete_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    builds: list[int] = []

    def build(tmp: Path, n: int) -> None:
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(bytes([n]) * 1000)
        time.sleep(0.2)  # all builders overlap
        (tmp / "config.json").write_text(f'{{"builder": {n}}}')
        builds.append(n)

    threads = [threading.Thread(target=lambda n=n: materialize(target, lambda t: build(t, n))) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(builds) == 4
    winner = int((target / "config.json").read_text().split(":")[1].strip(" }"))
    assert (target / "weights.bin").read_bytes() == bytes([winner]) * 1000  # one builder's files, not a mix
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the losers' temporaries are gone
    materialize(target, lambda t: pytest.fail("a complete checkpoint is never rebuilt"))


def test_an_interrupted_build_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    def broken(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        materialize(tmp_path / "ckpt", broken)
    assert list(tmp_path.iterdir()) == []


def test_hub_ids_and_local_directories_pass_through(tmp_path: Path) -> None:
    assert resolve_model_path("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
