"""Checks on the input before any model work: every shard's schema, and the ids.

Resume and exactly-once output are keyed on ``id``, so ids must be present and unique. The
driver reads the footers of every file and the ``id`` column (not the images), then either
fails (``input.id_policy: fail``, naming a few offending ids and the counts) or plans the drop
(``drop_duplicates``): rows without an id go, and of each repeated id only its first row stays
(files in path order, rows in file order). The kept first rows are staged as one small Parquet
file under the output (``_input/``, skipped by readers) and read beside the corpus, whose rows
with a repeated id are filtered out: a deterministic choice that every resume repeats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.config import ConfigError

from .storage import Location

STAGED_DIR = "_input"
STAGED_FILE = "first_rows_of_repeated_ids.parquet"
EXAMPLES = 5
# The required columns (schema.INPUT_COLUMNS) and the types the job reads; prompts stored as
# bytes are decoded per row (UTF-8).
TEXT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary())
ACCEPTED_TYPES = {
    "id": (pa.string(), pa.large_string()),
    "image": (pa.binary(), pa.large_binary()),
    "prompt": TEXT_TYPES,  # without a task spec; with one, the columns its prompts read (``text_columns``)
}


class InputError(ConfigError):
    """The input cannot be processed as it is (schema, ids); the message names file and column.
    A ``ConfigError``: the job stops before any work, and the CLIs exit with status 2."""


@dataclass
class InputPlan:
    files: list[str]  # as the filesystem names them, in path order
    rows: int  # rows in all files
    dropped: dict[str, int] = field(default_factory=dict)  # {"missing id": n, "repeated id": n}
    excluded_ids: list[str] = field(default_factory=list)  # repeated ids: their kept row comes from `first_rows`
    first_rows: pa.Table | None = None
    columns: list[str] = field(default_factory=list)  # the shards' columns

    @property
    def expected_rows(self) -> int:
        """Rows the output must hold once the run is complete."""
        return self.rows - sum(self.dropped.values())


def check_input(
    source: Location, policy: str, files: list[str] | None = None, text_columns: dict[str, str] | None = None,
) -> InputPlan:
    """Validate every shard's schema and the ids of ``source`` (or of its ``files`` only, relative
    to it: an incremental run's shards); the plan for ``policy``. ``text_columns``: the columns
    the prompts read, each with the config field that names it (None: ``prompt``, required)."""
    path = source.uri
    dataset = source.parquet_dataset(files)
    fragments = sorted(dataset.get_fragments(), key=lambda f: f.path)
    if not fragments:
        raise InputError(f"input {path}: no Parquet files found")
    schemas = [source.retrying(lambda f=f: f.physical_schema, f"reading the footer of {f.path}") for f in fragments]
    _check_schemas([f.path for f in fragments], schemas, text_columns)

    ids = source.retrying(lambda: dataset.to_table(columns=["id"]).column("id"), f"reading the ids of {path}")
    plan = InputPlan(files=[f.path for f in fragments], rows=len(ids), columns=list(schemas[0].names))
    missing = int(pc.sum(pc.or_kleene(pc.is_null(ids), pc.equal(pc.utf8_length(ids), 0)).fill_null(True)).as_py() or 0)
    counts = pa.table({"id": ids}).filter(pc.is_valid(pc.field("id"))).group_by("id").aggregate([("id", "count")])
    repeated = counts.filter(pc.greater(counts.column("id_count"), 1))
    extra_rows = int(pc.sum(repeated.column("id_count")).as_py() or 0) - repeated.num_rows
    repeated_ids = sorted(i for i in repeated.column("id").to_pylist() if i)
    if not missing and not repeated_ids:
        return plan
    if policy == "fail":
        problems = []
        if missing:
            problems.append(f"{missing} row(s) with a null or empty id")
        if repeated_ids:
            shown = ", ".join(repr(i) for i in repeated_ids[:EXAMPLES])
            problems.append(f"{len(repeated_ids)} id(s) repeated over {extra_rows + len(repeated_ids)} rows (e.g. {shown})")
        raise InputError(
            f"input {path}: {' and '.join(problems)}. Ids must be present and unique (resume and exactly-once output "
            "are keyed on them): fix the input, or set input.id_policy: drop_duplicates to drop rows without an id and "
            "keep the first row of each repeated id"
        )
    plan.dropped = {k: v for k, v in (("missing id", missing), ("repeated id", extra_rows)) if v}
    plan.excluded_ids = repeated_ids
    if repeated_ids:
        plan.first_rows = _first_rows(fragments, repeated_ids, schemas[0], source)
    return plan


def _check_schemas(paths: list[str], schemas: list[pa.Schema], text_columns: dict[str, str] | None) -> None:
    first = schemas[0]
    required = dict(ACCEPTED_TYPES)
    if text_columns is not None:
        required.pop("prompt")
        required |= {c: TEXT_TYPES for c in text_columns}
    for path, schema in zip(paths, schemas, strict=True):
        for name, types in required.items():
            if name not in schema.names:
                named_by = f"{text_columns[name]} names column {name!r}, but " if text_columns and name in text_columns else ""
                raise InputError(f"{named_by}input file {path}: lacks required column {name!r} (columns: {schema.names})")
            if schema.field(name).type not in types:
                raise InputError(
                    f"input file {path}: column {name!r} is {schema.field(name).type}, expected one of "
                    f"{', '.join(str(t) for t in types)}"
                )
        for f in first:
            if f.name not in schema.names:
                raise InputError(f"input file {path}: lacks column {f.name!r} that {paths[0]} has")
            if schema.field(f.name).type != f.type:
                raise InputError(
                    f"input file {path}: column {f.name!r} is {schema.field(f.name).type}, but {f.type} in {paths[0]}"
                )
        extra = [n for n in schema.names if n not in first.names]
        if extra:
            raise InputError(f"input file {path}: has column(s) {extra} that {paths[0]} lacks")


def _first_rows(
    fragments: list[pads.Fragment], repeated_ids: list[str], schema: pa.Schema, source: Location
) -> pa.Table:
    """The first row of each repeated id, files in path order and rows in file order."""
    wanted = pc.field("id").isin(pa.array(repeated_ids, type=schema.field("id").type))
    seen: set[str] = set()
    parts = []
    for frag in fragments:
        table = source.retrying(lambda f=frag: f.to_table(filter=wanted, schema=schema), f"reading {frag.path}")
        keep = []
        for i, rid in enumerate(table.column("id").to_pylist()):
            if rid not in seen:
                seen.add(rid)
                keep.append(i)
        if keep:
            parts.append(table.take(keep))
    return pa.concat_tables(parts)


def stage_first_rows(plan: InputPlan, output: Location) -> Location | None:
    """Write the plan's kept first rows under ``output``; returns the file (None: nothing)."""
    if plan.first_rows is None:
        return None
    folder = output.child(STAGED_DIR)
    target = folder.child(STAGED_FILE)
    fs = output.fs

    def write() -> None:
        fs.create_dir(folder.path, recursive=True)
        pq.write_table(plan.first_rows, target.path, filesystem=fs)

    output.retrying(write, f"writing {target.uri}")
    return target


def drop_rows(batch: pa.Table, excluded: frozenset[str]) -> pa.Table:
    """Ray Data map: drop rows without an id and rows whose id is in ``excluded``."""
    ids = batch.column("id")
    keep = pc.and_kleene(pc.is_valid(ids), pc.greater(pc.utf8_length(ids), 0))
    if excluded:
        keep = pc.and_kleene(keep, pc.invert(pc.is_in(ids, value_set=pa.array(sorted(excluded), type=ids.type))))
    return batch.filter(keep.fill_null(False))
