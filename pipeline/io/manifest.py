"""The per-run manifest: ``_manifest.json`` next to the output's Parquet files (local or object
storage). One file per run, one schema, extended by later features rather than duplicated.
Readers of the output ignore it: pyarrow and Ray skip files starting with ``_``.

Keys (version 1): ``manifest_version``, ``started_at`` / ``finished_at`` (UTC ISO 8601),
``config`` (the validated job config), ``packages`` (versions), ``rows`` (input, output, ok,
error, errors_by_kind), ``model`` (configured and resolved path, family, dtype), ``cost``
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

from .storage import filesystem_for, fs_path

MANIFEST_NAME = "_manifest.json"
MANIFEST_VERSION = 1
PACKAGES = ("resprune-pipeline", "torch", "transformers", "ray", "pyarrow", "numpy", "spacy", "pydantic", "pillow")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _location(output: str) -> tuple[pafs.FileSystem, str]:
    return filesystem_for(output) or pafs.LocalFileSystem(), f"{fs_path(output).rstrip('/')}/{MANIFEST_NAME}"


def write_manifest(output: str, manifest: dict[str, Any]) -> str:
    """Write ``manifest`` as ``<output>/_manifest.json``; returns where."""
    fs, path = _location(output)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps({"manifest_version": MANIFEST_VERSION, **manifest}, indent=2, sort_keys=True).encode())
    return path


def read_manifest(output: str) -> dict[str, Any]:
    fs, path = _location(output)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())
