"""Where a checkpoint comes from, resolved on the node that loads it (``model.path``).

- ``tiny:<recipe>``: a tiny test/demo checkpoint (``pipeline.tiny``, found by name in
  ``RESOLVERS``), cached under ``$RESPRUNE_CACHE``.
- ``s3://bucket/prefix/``: copied once per node to ``$RESPRUNE_CACHE/s3/bucket/prefix`` (local
  disk) and loaded from there; the driver copies only the JSON files (config, processor and
  tokenizer configs), which is all it reads. Use a versioned prefix per checkpoint: a copy is
  never refreshed.
- Anything else (a hub id, a local directory): as is; the hub caches under ``$HF_HOME``.

The job resolves ``model.path`` in the driver for its own reads and again in every actor, so
each node builds or downloads to its own disk. Builds and downloads go to a temporary sibling
directory renamed into place when complete: actors starting together on a node never load a
half-written checkpoint, and an interrupted copy is never mistaken for a finished one.
"""

from __future__ import annotations

import importlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.io.storage import Location, locate

TINY_PREFIX = "tiny:"
# Path prefixes resolved outside the product: prefix -> "module:function" taking the rest of the
# path and returning a local directory, imported only when a path uses it (as vLLM's registry
# names out-of-tree model classes), so the product never imports its test and demo scaffolding.
RESOLVERS: dict[str, str] = {TINY_PREFIX: "pipeline.tiny:checkpoint"}
S3_PREFIXES = ("s3://", "s3a://")


def cache_root() -> Path:
    return Path(os.environ.get("RESPRUNE_CACHE", Path.home() / ".cache" / "resprune-pipeline"))


def materialize(target: Path, build: Callable[[Path], object]) -> Path:
    """``target``, built by ``build(tmp)`` into a temporary sibling and renamed into place,
    unless a complete one (with ``config.json``) is already there."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: theirs is as good
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(source: Location | str, metadata_only: bool = False) -> str:
    """A local directory or hub id that ``from_pretrained`` takes, for ``model.path`` (located
    with the job's storage settings; a plain string: the default ones).
    ``metadata_only``: for an S3 prefix, copy only the JSON files (the driver's needs)."""
    source = locate(source) if isinstance(source, str) else source
    path = source.uri
    for prefix, target in RESOLVERS.items():
        if path.startswith(prefix):
            module, function = target.split(":")
            return getattr(importlib.import_module(module), function)(path[len(prefix) :])
    if path.startswith(S3_PREFIXES):
        return str(_s3_copy(source, metadata_only))
    return path


def _s3_copy(source: Location, metadata_only: bool) -> Path:
    uri, prefix, fs = source.uri, source.path.rstrip("/"), source.fs
    target = cache_root() / ("s3-metadata" if metadata_only else "s3") / prefix.strip("/")

    def copy(tmp: Path) -> None:
        infos = source.retrying(lambda: fs.get_file_info(pafs.FileSelector(prefix, recursive=True)), f"listing {uri}")
        files = [i for i in infos if i.type == pafs.FileType.File and (not metadata_only or i.path.endswith(".json"))]
        if not any(i.path == f"{prefix}/config.json" for i in files):
            raise FileNotFoundError(f"{uri} holds no config.json: not a checkpoint prefix")
        for info in files:
            dest = tmp / info.path[len(prefix) + 1 :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            source.retrying(lambda i=info, d=dest: pafs.copy_files(i.path, str(d), source_filesystem=fs,
                                                                   destination_filesystem=pafs.LocalFileSystem()),
                            f"copying {info.path}")

    return materialize(target, copy)
