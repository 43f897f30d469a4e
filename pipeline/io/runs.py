"""Scheduled runs over a growing corpus (``output.incremental``): annotate only new input.

The output path is a root of runs, ``<root>/run-<UTC time>/``. What a run took is recorded under
it, so the runs are the record of what was processed: no second ledger to keep in step. The unit
is the shard for Parquet and tar shards (listed in the run's manifest, ``input.shards``) and the
file for ``input.format: files`` (the run's staged listing, ``_input/listing.parquet``: one
Parquet column read per earlier run, never their output rows, so millions of files stay cheap;
docs/inputs.md has the measured cost). A new run takes the units that no run under the root
took. A run that did not complete (killed, failed, timed out) is finished first with its own
units, by resuming it: a retry never takes new units or redoes old ones, and units that land
while a run is going wait for the next one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.config import ConfigError, InputConfig

from . import formats
from .inputs import read_staged_listing
from .manifest import read_manifest
from .storage import Location

log = logging.getLogger(__name__)
RUN_PREFIX = "run-"


@dataclass(frozen=True)
class IncrementalRun:
    output: Location  # <root>/run-<stamp>
    shards: list[str] | None  # Parquet or tar shards relative to the input path, in path order (None: files)
    resumed: bool  # an unfinished earlier run, finished with its own units
    earlier_runs: int
    shards_taken_before: int  # units (shards, or files) the earlier runs took
    listing: pa.Table | None = None  # format files: the new files (None when resumed: its staged listing)


class NothingToRun(Exception):
    """No new shard since the last run: a scheduled run has nothing to do (not an error)."""


def run_name(now: datetime) -> str:
    return RUN_PREFIX + now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def list_shards(input_root: Location) -> list[str]:
    """The Parquet files under ``input_root``, relative to it (``_``/``.`` names skipped)."""
    dataset = input_root.parquet_dataset()
    root = input_root.path.rstrip("/") + "/"
    files = sorted(input_root.retrying(lambda: dataset.files, f"listing {input_root.uri}"))
    return [f[len(root) :] if f.startswith(root) else f for f in files]


def earlier_runs(output_root: Location) -> list[tuple[Location, dict]]:
    """``(run, manifest)`` of every run under ``output_root``, oldest first; a run
    directory without a manifest (it died before writing any row) is skipped."""
    runs = []
    for name in sorted(i.base_name for i in output_root.list_dir() if i.type == pafs.FileType.Directory):
        if not name.startswith(RUN_PREFIX):
            continue
        path = output_root.child(name)
        manifest = read_manifest(path)
        if manifest is None:
            log.warning("%s has no manifest (it stopped before writing a row): not counted as a run", path.uri)
            continue
        section = manifest.get("input", {})
        if not isinstance(section.get("shards"), list) and section.get("format") != "files":
            raise ConfigError(
                f"output.path {output_root.uri!r}: {path.uri} is not an incremental run (its manifest lists no input shards); "
                "an incremental output root must hold only the runs it made"
            )
        runs.append((path, manifest))
    return runs


def plan_incremental(inputs: InputConfig, roots: list[Location], output_root: Location,
                     now: datetime | None = None) -> IncrementalRun:
    """The run to do now: the oldest unfinished run (resumed), else a new run of the units no
    run took. Raises ``NothingToRun`` when there are none."""
    runs = earlier_runs(output_root)
    for path, manifest in runs:
        made_as = manifest["input"].get("format", "parquet")
        if made_as != inputs.format:
            raise ConfigError(f"input.format: {inputs.format}, but {path.uri} under output.path read {made_as}: an "
                              "incremental root holds runs of one format")
    files = inputs.format == "files"
    taken = taken_files([path for path, _ in runs]) if files else pa.array(sorted({s for _, m in runs for s in m["input"]["shards"]}),
                                                      pa.string())
    for path, manifest in runs:
        if manifest.get("status") != "completed":
            log.info("resuming the unfinished run %s (attempt %s was %s)", path.uri, manifest.get("attempt"),
                     manifest.get("status"))
            if not files:
                return IncrementalRun(path, list(manifest["input"]["shards"]), True, len(runs), len(taken))
            if read_staged_listing(path, ["id"]) is not None:
                return IncrementalRun(path, None, True, len(runs), len(taken))
            # It stopped before staging its listing, so before writing a row: it takes the new files now.
            return IncrementalRun(path, None, True, len(runs), len(taken), _new_files(inputs, roots, taken))
    output = output_root.child(run_name(now or datetime.now(timezone.utc)))
    if any(path.uri == output.uri for path, _ in runs):
        raise ConfigError(f"output.path {output_root.uri!r}: {output.uri} already exists (two runs in the same second)")
    if files:
        listing = _new_files(inputs, roots, taken)
        if listing.num_rows:
            return IncrementalRun(output, None, False, len(runs), len(taken), listing)
    else:
        new = [s for s in list_units(inputs, roots[0]) if s not in set(taken.to_pylist())]
        if new:
            return IncrementalRun(output, new, False, len(runs), len(taken))
    raise NothingToRun(
        f"no new {'image files' if files else 'input shards'} under {', '.join(r.uri for r in roots)}: all "
        f"{len(taken)} were taken by the {len(runs)} run(s) under {output_root.uri}"
    )


def list_units(inputs: InputConfig, root: Location) -> list[str]:
    """The shards under ``root`` (Parquet or tar) relative to it, in path order."""
    return formats.list_tar_shards(root) if inputs.format == "webdataset" else list_shards(root)


def taken_files(runs: list[Location]) -> pa.Array:
    """Every file (reference) the files runs at ``runs`` staged, as one array: one Parquet column
    per run, never their output rows."""
    parts = [t.column("image") for t in (read_staged_listing(path, ["image"]) for path in runs) if t is not None]
    return pa.chunked_array(parts, pa.string()).combine_chunks() if parts else pa.array([], pa.string())


def unseen(listing: pa.Table, taken: pa.Array) -> pa.Table:
    """The rows of a files listing whose reference is not in ``taken`` (a hash lookup each)."""
    return listing.filter(pc.invert(pc.is_in(listing.column("image"), value_set=taken))) if len(taken) else listing


def _new_files(inputs: InputConfig, roots: list[Location], taken: pa.Array) -> pa.Table:
    return unseen(formats.list_files(roots, inputs.extensions), taken)
