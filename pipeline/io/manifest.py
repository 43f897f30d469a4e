"""The per-run manifest: ``_manifest.json`` next to the output's Parquet files (local or object
storage). One file per run, one schema, extended by later features rather than duplicated.
Readers of the output ignore it: pyarrow and Ray skip files starting with ``_``. It is written
when an attempt starts (``status: running``) and again when it ends (``completed`` or
``failed``), so a killed run leaves one saying which attempt died.

Keys (version 2): ``manifest_version``, ``status``, ``attempt`` (1 for a fresh run, +1 per
``--resume``), ``attempts`` (per attempt: number, started_at, finished_at, status, rows written
by it, error), ``started_at`` / ``finished_at`` (this attempt, UTC ISO 8601), ``config`` (the
validated job config), ``packages`` (versions), ``input`` (files, rows, ids dropped by
``input.id_policy``), ``rows`` (input, expected, output, ok, error, errors_by_kind,
skipped_already_done, written_this_attempt, missing_ids, duplicate_ids, truncated_prompts),
``visual_tokens`` (mean_in, mean_kept, and per answered image ``kept`` and ``energy_explained``:
mean, p50, p90, min, max; ``pipeline.pruning.per_image_stats``), ``model`` (configured and
resolved path, family, dtype), ``engine`` (the decode engine: name,
package, version, the interpreter its actors ran in), ``warnings`` (what the plan warned of, e.g.
a preparation pool that cannot feed the GPU pools: ``pipeline.plan.check_prepare_pool``), ``cost``
(see ``pipeline.cost.accounting.CostModel.run_totals``: accelerator, prices with sources,
FLOP convention, shapes, totals and mean per image of every cost column, per-stage busy time
and images/s, the run's reservation and the share of it the rows account for).
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from typing import Any

import pyarrow.fs as pafs

from .storage import Location

MANIFEST_NAME = "_manifest.json"
MANIFEST_VERSION = 2
PACKAGES = ("resprune-pipeline", "torch", "transformers", "ray", "pyarrow", "numpy", "spacy", "pydantic", "pillow")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_manifest(output: Location, manifest: dict[str, Any]) -> str:
    """Write ``manifest`` as ``<output>/_manifest.json``; returns where."""
    fs, path = output.fs, output.child(MANIFEST_NAME).path
    body = json.dumps({"manifest_version": MANIFEST_VERSION, **manifest}, indent=2, sort_keys=True).encode()

    def write() -> None:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(body)

    output.retrying(write, f"writing {path}")
    return path


def read_manifest(output: Location) -> dict[str, Any] | None:
    """The manifest under ``output``; None when there is none."""
    fs, path = output.fs, output.child(MANIFEST_NAME).path

    def read() -> dict[str, Any] | None:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    return output.retrying(read, f"reading {path}")
