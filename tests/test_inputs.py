"""Input checks before any model work: shard schemas and ids (pipeline/io/inputs.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.inputs import InputError, check_input, drop_rows, stage_first_rows
from pipeline.io.storage import locate
from pipeline.tiny.shapes_world import SCHEMA, make_rows


def _shard(path: Path, rows: list[dict], schema: pa.Schema = SCHEMA) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def test_a_shard_with_another_schema_fails_naming_file_and_column(tmp_path: Path) -> None:
    rows = make_rows(4, seed=1)
    _shard(tmp_path / "in" / "a.parquet", rows[:2])
    bad = pa.schema([f if f.name != "prompt" else pa.field("prompt", pa.int64()) for f in SCHEMA])
    _shard(tmp_path / "in" / "b.parquet", [dict(r, prompt=7) for r in rows[2:]], bad)
    with pytest.raises(InputError, match=r"b.parquet: column 'prompt' is int64, expected one of string"):
        check_input(locate(str(tmp_path / "in")), "fail")

    extra = pa.schema([*SCHEMA, pa.field("source", pa.string())])
    _shard(tmp_path / "in2" / "a.parquet", rows[:2])
    _shard(tmp_path / "in2" / "b.parquet", [dict(r, source="x") for r in rows[2:]], extra)
    with pytest.raises(InputError, match=r"b.parquet: has column\(s\) \['source'\] that .*a.parquet lacks"):
        check_input(locate(str(tmp_path / "in2")), "fail")

    other = pa.schema([f if f.name != "expected" else pa.field("expected", pa.int32()) for f in SCHEMA])
    _shard(tmp_path / "in3" / "a.parquet", rows[:2])
    _shard(tmp_path / "in3" / "b.parquet", [dict(r, expected=1) for r in rows[2:]], other)
    with pytest.raises(InputError, match=r"b.parquet: column 'expected' is int32, but string in .*a.parquet"):
        check_input(locate(str(tmp_path / "in3")), "fail")


def test_ids_fail_or_drop_keeping_the_first_row_in_file_order(tmp_path: Path) -> None:
    rows = make_rows(6, seed=2)
    later = dict(rows[1], prompt="second copy, in a later file")
    same_file = dict(rows[0], prompt="second copy, same file")
    _shard(tmp_path / "in" / "a.parquet", [rows[0], rows[1], same_file, dict(rows[2], id=None)])
    _shard(tmp_path / "in" / "b.parquet", [later, rows[3], dict(rows[4], id=""), rows[5]])
    with pytest.raises(InputError, match=r"2 row\(s\) with a null or empty id and 2 id\(s\) repeated over 4 rows"):
        check_input(locate(str(tmp_path / "in")), "fail")

    plan = check_input(locate(str(tmp_path / "in")), "drop_duplicates")
    assert (plan.rows, plan.expected_rows, plan.dropped) == (8, 4, {"missing id": 2, "repeated id": 2})
    assert plan.excluded_ids == sorted([rows[0]["id"], rows[1]["id"]])
    first = {r["id"]: r["prompt"] for r in plan.first_rows.to_pylist()}
    assert first == {rows[0]["id"]: rows[0]["prompt"], rows[1]["id"]: rows[1]["prompt"]}

    # What the job reads: the corpus without missing or repeated ids, plus the staged first rows.
    corpus = pa.concat_tables(pq.read_table(tmp_path / "in" / n) for n in ("a.parquet", "b.parquet"))
    kept = drop_rows(corpus, frozenset(plan.excluded_ids))
    staged = pq.read_table(stage_first_rows(plan, locate(str(tmp_path / "out"))).path)
    ids = kept.column("id").to_pylist() + staged.column("id").to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in rows if r is not rows[2] and r is not rows[4])


def test_clean_input_needs_no_plan(tmp_path: Path) -> None:
    _shard(tmp_path / "in" / "a.parquet", make_rows(3, seed=3))
    plan = check_input(locate(str(tmp_path / "in")), "fail")
    assert (plan.rows, plan.expected_rows, plan.dropped, plan.first_rows) == (3, 3, {}, None)
    assert stage_first_rows(plan, locate(str(tmp_path / "out"))) is None and not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="no Parquet files"):
        (tmp_path / "empty").mkdir()
        check_input(locate(str(tmp_path / "empty")), "fail")
