"""Checks on the input before any model work: what will be read (``plan_input``, per
``input.format``: Parquet shards' schemas, or the listing of image files or tar samples), and the ids.

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
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import ConfigError, InputConfig

from . import formats
from .storage import Location

STAGED_DIR = "_input"
STAGED_FILE = "first_rows_of_repeated_ids.parquet"
LISTING_FILE = "listing.parquet"  # format files / webdataset: what the run reads
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
    files: list[str]  # Parquet or tar shards as the filesystem names them, in path order ([]: format files)
    rows: int  # rows (image files, tar samples) in all of the input
    dropped: dict[str, int] = field(default_factory=dict)  # {"missing id": n, "repeated id": n}
    excluded_ids: list[str] = field(default_factory=list)  # repeated ids: their kept row comes from `first_rows`
    first_rows: pa.Table | None = None
    columns: list[str] = field(default_factory=list)  # the shards' columns (as read, before any fetch)
    format: str = "parquet"
    # files: id, image (the reference); webdataset: id, shard, error. Staged under the output (a
    # resume reads it back) whole: the id policy's drops are applied as it is read.
    listing: pa.Table | None = None
    skip: dict[str, list[str]] = field(default_factory=dict)  # webdataset: per shard, keys the id policy dropped
    problems: list[str] = field(default_factory=list)  # webdataset: shards cut short, members left out (warnings)

    @property
    def expected_rows(self) -> int:
        """Rows the output must hold once the run is complete."""
        return self.rows - sum(self.dropped.values())

    def manifest_fields(self) -> dict[str, object]:
        """What the manifest's ``input`` section says about a listing (none for Parquet)."""
        if self.listing is None:
            return {}
        fields: dict[str, object] = {"listing": f"{STAGED_DIR}/{LISTING_FILE}"}
        if self.format == "webdataset":
            fields |= {"text_columns": self.columns[2:], "problems": self.problems}
        return fields


def plan_input(
    inputs: InputConfig, roots: list[Location], units: list[str] | pa.Table | None = None,
    text_columns: dict[str, str] | None = None, staged: pa.Table | None = None,
) -> InputPlan:
    """What the run reads from ``roots`` (``input.path`` located) in ``inputs.format``, checked:
    ``units`` an incremental run's shards (relative) or, for files, its listing; ``staged`` the
    listing an earlier attempt of this run staged (a resume reads exactly what it did)."""
    if inputs.format == "parquet":
        return check_input(roots[0], inputs.id_policy, units, text_columns, inputs.image_column, inputs.prompt)
    if inputs.format == "files":
        if staged is not None:
            listing = staged
        elif isinstance(units, pa.Table):
            listing = units
        else:
            listing = formats.list_files(roots, inputs.extensions)
        where = ", ".join(r.uri for r in roots)
        if listing.num_rows == 0:
            raise InputError(f"input {where}: no image files (extensions {', '.join(inputs.extensions)}) found")
        plan = InputPlan(files=[], rows=listing.num_rows, columns=["id", "image"], format="files", listing=listing)
    else:
        root = roots[0]
        if staged is not None:
            index = formats.ShardIndex.from_table(staged)
        else:
            shards = list(units) if units is not None else formats.list_tar_shards(root)
            if not shards:
                raise InputError(f"input {root.uri}: no tar shards (*.tar) found")
            index = formats.index_shards(root, shards, inputs.extensions)
        if index.table.num_rows == 0:
            raise InputError(f"input {root.uri}: the tar shards hold no sample")
        files = sorted(set(index.table.column("shard").to_pylist()) | set(index.empty_shards))
        plan = InputPlan(files=[f"{root.path.rstrip('/')}/{f}" for f in files], rows=index.table.num_rows,
                         columns=["id", "image", *index.text_columns], format="webdataset", listing=index.to_table(),
                         problems=index.problems + ([f"input {root.uri}: members with extension(s) "
                                                     f"{', '.join(index.left_out)} are not all UTF-8 text: not read"]
                                                    if index.left_out else []))
    _check_listed_columns(plan.columns, text_columns, inputs.prompt, ", ".join(r.uri for r in roots))
    ids = plan.listing.column("id")
    missing, repeated_ids, extra_rows = _id_problems(ids)
    _apply_policy(plan, inputs.id_policy, ", ".join(r.uri for r in roots), missing, repeated_ids, extra_rows)
    if repeated_ids and plan.format == "webdataset":
        plan.skip = _later_repeats(plan.listing)
    return plan


def _check_listed_columns(columns: list[str], text_columns: dict[str, str] | None, prompt: str | None, where: str) -> None:
    if text_columns is None and prompt is None:
        raise InputError(f"input {where}: image files and tar shards hold no `prompt` column: set input.prompt, or "
                         "give a task spec (tasks)")
    for name, field_name in (text_columns or {}).items():
        if name not in columns:
            raise InputError(f"{field_name} names column {name!r}, but input {where} has only {columns}")


def first_of_repeated(plan: InputPlan) -> dict[str, str]:
    """Format files: each repeated id's first file (prefix order, then path order), the one kept."""
    first: dict[str, str] = {}
    repeated = set(plan.excluded_ids)
    for rid, ref in zip(plan.listing.column("id").to_pylist(), plan.listing.column("image").to_pylist(), strict=True):
        if rid in repeated:
            first.setdefault(rid, ref)
    return first


def keep_first_of_repeated(batch: pa.Table, first: dict[str, str]) -> pa.Table:
    """Ray Data map: drop the listing rows of a repeated id but its first file."""
    keep = [first.get(rid, ref) == ref for rid, ref in zip(batch.column("id").to_pylist(),
                                                             batch.column("image").to_pylist(), strict=True)]
    return batch.filter(pa.array(keep, pa.bool_()))


def _later_repeats(listing: pa.Table) -> dict[str, list[str]]:
    """Webdataset: per shard, the keys whose first sample is in an earlier shard (a repeat later
    in the same shard is skipped by the reader itself, which keeps a shard's first)."""
    first: dict[str, str] = {}
    skip: dict[str, list[str]] = {}
    for rid, shard in zip(listing.column("id").to_pylist(), listing.column("shard").to_pylist(), strict=True):
        if first.setdefault(rid, shard) != shard and rid not in skip.get(shard, ()):
            skip.setdefault(shard, []).append(rid)
    return skip


def check_input(
    source: Location, policy: str, files: list[str] | None = None, text_columns: dict[str, str] | None = None,
    image_column: str | None = None, prompt: str | None = None,
) -> InputPlan:
    """Validate every shard's schema and the ids of ``source`` (or of its ``files`` only, relative
    to it: an incremental run's shards); the plan for ``policy``. ``text_columns``: the columns
    the prompts read, each with the config field that names it (None: ``prompt``, required unless
    ``prompt`` gives every row one). ``image_column``: the column of image references (else bytes in ``image``)."""
    path = source.uri
    dataset = source.parquet_dataset(files)
    fragments = sorted(dataset.get_fragments(), key=lambda f: f.path)
    if not fragments:
        raise InputError(f"input {path}: no Parquet files found")
    schemas = [source.retrying(lambda f=f: f.physical_schema, f"reading the footer of {f.path}") for f in fragments]
    _check_schemas([f.path for f in fragments], schemas, text_columns, image_column, prompt)

    ids = source.retrying(lambda: dataset.to_table(columns=["id"]).column("id"), f"reading the ids of {path}")
    plan = InputPlan(files=[f.path for f in fragments], rows=len(ids), columns=list(schemas[0].names))
    missing, repeated_ids, extra_rows = _id_problems(ids)
    _apply_policy(plan, policy, path, missing, repeated_ids, extra_rows)
    if repeated_ids:
        plan.first_rows = _first_rows(fragments, repeated_ids, schemas[0], source)
    return plan


def _id_problems(ids: pa.ChunkedArray) -> tuple[int, list[str], int]:
    """``(rows without an id, repeated ids sorted, rows beyond the first of each repeated id)``."""
    missing = int(pc.sum(pc.or_kleene(pc.is_null(ids), pc.equal(pc.utf8_length(ids), 0)).fill_null(True)).as_py() or 0)
    counts = pa.table({"id": ids}).filter(pc.is_valid(pc.field("id"))).group_by("id").aggregate([("id", "count")])
    repeated = counts.filter(pc.greater(counts.column("id_count"), 1))
    extra_rows = int(pc.sum(repeated.column("id_count")).as_py() or 0) - repeated.num_rows
    return missing, sorted(i for i in repeated.column("id").to_pylist() if i), extra_rows


def _apply_policy(plan: InputPlan, policy: str, path: str, missing: int, repeated_ids: list[str], extra_rows: int) -> None:
    if not missing and not repeated_ids:
        return
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


def _check_schemas(
    paths: list[str], schemas: list[pa.Schema], text_columns: dict[str, str] | None, image_column: str | None = None,
    prompt: str | None = None,
) -> None:
    first = schemas[0]
    required = dict(ACCEPTED_TYPES)
    if image_column:  # references: strings, fetched by the job
        required.pop("image")
        required[image_column] = (pa.string(), pa.large_string())
    if text_columns is not None or prompt is not None:
        required.pop("prompt")
        required |= {c: TEXT_TYPES for c in text_columns or {}}
    if prompt is not None and "prompt" in first.names:
        raise InputError(f"input.prompt: input file {paths[0]} has a `prompt` column; give each row's prompt one way")
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


def stage_listing(plan: InputPlan, output: Location) -> Location | None:
    """Write the plan's listing under ``output`` unless an earlier attempt did (it is the same:
    a resume read it back); returns the file (None: a Parquet input has no listing). Row groups
    of ``formats.LISTING_ROW_GROUP`` rows are the blocks Ray Data reads it in."""
    if plan.listing is None:
        return None
    target = output.child(STAGED_DIR).child(LISTING_FILE)
    fs = output.fs

    def write() -> None:
        if fs.get_file_info(target.path).type == pafs.FileType.File:
            return
        fs.create_dir(output.child(STAGED_DIR).path, recursive=True)
        pq.write_table(plan.listing, target.path, filesystem=fs, row_group_size=formats.LISTING_ROW_GROUP)

    output.retrying(write, f"writing {target.uri}")
    return target


def read_staged_listing(output: Location, columns: list[str] | None = None) -> pa.Table | None:
    """The listing an earlier attempt of the run at ``output`` staged (``columns`` of it), if any."""
    target = output.child(STAGED_DIR).child(LISTING_FILE)
    fs = output.fs

    def read() -> pa.Table | None:
        if fs.get_file_info(target.path).type != pafs.FileType.File:
            return None
        return pq.read_table(target.path, filesystem=fs, columns=columns)

    return output.retrying(read, f"reading {target.uri}")


def drop_rows(batch: pa.Table, excluded: frozenset[str]) -> pa.Table:
    """Ray Data map: drop rows without an id and rows whose id is in ``excluded``."""
    ids = batch.column("id")
    keep = pc.and_kleene(pc.is_valid(ids), pc.greater(pc.utf8_length(ids), 0))
    if excluded:
        keep = pc.and_kleene(keep, pc.invert(pc.is_in(ids, value_set=pa.array(sorted(excluded), type=ids.type))))
    return batch.filter(keep.fill_null(False))
