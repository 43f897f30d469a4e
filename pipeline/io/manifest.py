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
package, version, the interpreter its actors ran in), ``cost``
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

from pipeline.config import StorageConfig

from .storage import filesystem_for, fs_path, local_or, retrying

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


def _location(output: str, storage: StorageConfig | None) -> tuple[pafs.FileSystem, str]:
    return local_or(filesystem_for(output, storage)), f"{fs_path(output).rstrip('/')}/{MANIFEST_NAME}"


def write_manifest(output: str, manifest: dict[str, Any], storage: StorageConfig | None = None) -> str:
    """Write ``manifest`` as ``<output>/_manifest.json``; returns where."""
    fs, path = _location(output, storage)
    body = json.dumps({"manifest_version": MANIFEST_VERSION, **manifest}, indent=2, sort_keys=True).encode()

    def write() -> None:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(body)

    retrying(write, f"writing {path}", storage)
    return path


def read_manifest(output: str, storage: StorageConfig | None = None) -> dict[str, Any] | None:
    """The manifest under ``output``; None when there is none."""
    fs, path = _location(output, storage)

    def read() -> dict[str, Any] | None:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    return retrying(read, f"reading {path}", storage)
