"""Scheduled runs over a growing corpus (``output.incremental``): annotate only new shards.

The output path is a root of runs, ``<root>/run-<UTC time>/``. Each run's manifest records the
input shards (files, relative to the input path) it took, so the manifests are the record of
what was processed: no second ledger to keep in step. A new run takes the shards that no run
under the root took. A run that did not complete (killed, failed, timed out) is finished first
with its own shards, by resuming it: a retry never takes new shards or redoes old ones, and
shards that land while a run is going wait for the next one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow.fs as pafs

from pipeline.config import ConfigError

from .manifest import read_manifest
from .storage import Location

log = logging.getLogger(__name__)
RUN_PREFIX = "run-"


@dataclass(frozen=True)
class IncrementalRun:
    output: Location  # <root>/run-<stamp>
    shards: list[str]  # input files relative to the input path, in path order
    resumed: bool  # an unfinished earlier run, finished with its own shards
    earlier_runs: int
    shards_taken_before: int


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
        if not isinstance(manifest.get("input", {}).get("shards"), list):
            raise ConfigError(
                f"output.path {output_root.uri!r}: {path.uri} is not an incremental run (its manifest lists no input shards); "
                "an incremental output root must hold only the runs it made"
            )
        runs.append((path, manifest))
    return runs


def plan_incremental(input_root: Location, output_root: Location, now: datetime | None = None) -> IncrementalRun:
    """The run to do now: the oldest unfinished run (resumed), else a new run of the shards no
    run took. Raises ``NothingToRun`` when there are none."""
    runs = earlier_runs(output_root)
    taken = {s for _, m in runs for s in m["input"]["shards"]}
    for path, manifest in runs:
        if manifest.get("status") != "completed":
            log.info("resuming the unfinished run %s (attempt %s was %s)", path.uri, manifest.get("attempt"),
                     manifest.get("status"))
            return IncrementalRun(path, list(manifest["input"]["shards"]), True, len(runs), len(taken))
    new = [s for s in list_shards(input_root) if s not in taken]
    if not new:
        raise NothingToRun(
            f"no new input shards under {input_root.uri}: all {len(taken)} were taken by the {len(runs)} run(s) under "
            f"{output_root.uri}"
        )
    output = output_root.child(run_name(now or datetime.now(timezone.utc)))
    if any(path.uri == output.uri for path, _ in runs):
        raise ConfigError(f"output.path {output_root.uri!r}: {output.uri} already exists (two runs in the same second)")
    return IncrementalRun(output, new, False, len(runs), len(taken))
