"""Incremental runs (output.incremental): which shards a scheduled run takes, from the run
manifests alone. No Ray here: the job end to end is in tests/test_cluster.py."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.io.storage import locate
from pipeline.io.manifest import write_manifest
from pipeline.config import InputConfig
from pipeline.io.runs import NothingToRun, list_shards, plan_incremental, run_name
from pipeline.tiny.shapes_world import SCHEMA, make_rows

from .conftest import REPO

NOW = datetime(2026, 11, 24, 2, 0, 5, tzinfo=timezone.utc)
PARQUET = InputConfig(path="unused")  # the default format: Parquet shards


def _shard(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = make_rows(2, seed=seed)
    for r in rows:
        r["id"] = f"{path.stem}-{r['id']}"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)


def _run(root: Path, name: str, shards: list[str], status: str) -> Path:
    out = root / name
    write_manifest(locate(str(out)), {"status": status, "attempt": 1, "input": {"files": len(shards), "shards": shards}})
    return out


def test_shards_are_listed_relative_to_the_input_and_sorted(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    for rel in ("dt=2026-11-23/b.parquet", "dt=2026-11-23/a.parquet", "dt=2026-11-22/z.parquet"):
        _shard(corpus / rel, seed=len(rel))
    (corpus / "_staging").mkdir()
    _shard(corpus / "_staging" / "half-written.parquet", seed=9)  # skipped, like every reader skips it
    assert list_shards(locate(str(corpus))) == ["dt=2026-11-22/z.parquet", "dt=2026-11-23/a.parquet", "dt=2026-11-23/b.parquet"]


def test_a_new_run_takes_only_the_shards_no_run_took(tmp_path: Path) -> None:
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    for name in ("a", "b", "c"):
        _shard(corpus / f"{name}.parquet", seed=ord(name))
    first = plan_incremental(PARQUET, [locate(str(corpus))], locate(str(out)), now=NOW)
    assert first.shards == ["a.parquet", "b.parquet", "c.parquet"] and not first.resumed
    assert first.output.uri == f"{out}/{run_name(NOW)}" == f"{out}/run-20261124T020005Z"
    _run(out, "run-20261124T020005Z", first.shards, "completed")

    _shard(corpus / "d.parquet", seed=4)
    second = plan_incremental(PARQUET, [locate(str(corpus))], locate(str(out)), now=NOW.replace(day=25))
    assert second.shards == ["d.parquet"]
    assert (second.earlier_runs, second.shards_taken_before) == (1, 3)
    _run(out, "run-20261125T020005Z", second.shards, "completed")

    with pytest.raises(NothingToRun, match="all 4 were taken by the 2 run"):
        plan_incremental(PARQUET, [locate(str(corpus))], locate(str(out)), now=NOW.replace(day=26))


def test_an_unfinished_run_is_resumed_with_its_own_shards_before_any_new_one(tmp_path: Path) -> None:
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    for name in ("a", "b", "c"):
        _shard(corpus / f"{name}.parquet", seed=ord(name))
    _run(out, "run-20261123T020000Z", ["a.parquet"], "completed")
    failed = _run(out, "run-20261124T020000Z", ["b.parquet"], "failed")
    _run(out, "run-20261124T030000Z", ["c.parquet"], "running")  # killed: its manifest still says running
    (out / "run-20261124T040000Z").mkdir()  # died before its manifest: not a run, takes nothing
    plan = plan_incremental(PARQUET, [locate(str(corpus))], locate(str(out)), now=NOW)
    # The oldest unfinished run goes first, with its own shard only (c waits for its own run).
    assert (plan.output.uri, plan.shards, plan.resumed) == (str(failed), ["b.parquet"], True)


def test_an_output_root_holding_other_runs_is_refused(tmp_path: Path) -> None:
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    _shard(corpus / "a.parquet", seed=1)
    write_manifest(locate(str(out / "run-001")), {"status": "completed", "input": {"files": 1}})  # a plain, non-incremental run
    with pytest.raises(ConfigError, match="run-001 is not an incremental run"):
        plan_incremental(PARQUET, [locate(str(corpus))], locate(str(out)), now=NOW)


def test_incremental_never_overwrites(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"output: .*mode overwrite with incremental"):
        load_config(REPO / "configs/local.yaml", {"output.incremental": True})  # local.yaml has mode: overwrite
    cfg = load_config(REPO / "configs/local.yaml", {"output.incremental": True, "output.mode": "resume"})
    assert cfg.output.incremental
