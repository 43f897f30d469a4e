"""Paths and URIs: local directories or S3-compatible object storage.

S3 goes through ``pyarrow.fs.S3FileSystem``: the endpoint is ``storage.endpoint_url`` or
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (MinIO, moto, ...), credentials come from the
standard AWS chain (environment, profile, instance or pod role) and are never passed, logged or
stored by this package. Every storage call the driver makes goes through ``retrying``: bounded
attempts with exponential backoff on the transient errors Ray Data itself retries.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.dataset as pads
import pyarrow.fs as pafs
from ray.data.context import DEFAULT_RETRIED_IO_ERRORS

from pipeline.config import StorageConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
# Transient: Ray Data's own list (AWS throttling, network, 5xx) plus what a refused or dropped
# connection says through pyarrow's S3 client.
TRANSIENT_ERRORS = (*DEFAULT_RETRIED_IO_ERRORS, "Couldn't connect to server", "Connection refused", "curlCode: 7")


class StorageError(OSError):
    """A storage call that still failed after its retries (or failed permanently)."""


def is_uri(path: str) -> bool:
    return "://" in path


def filesystem_for(path: str, storage: StorageConfig | None = None) -> pafs.FileSystem | None:
    """A pyarrow filesystem for ``path``, None for a local path (let pyarrow infer)."""
    scheme = urlparse(path).scheme
    if scheme in ("s3", "s3a"):
        storage = storage or StorageConfig()
        endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {"endpoint_override": endpoint} if endpoint else {}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        # The client's own retries are the first line; `retrying` and Ray Data's write retries wrap it.
        return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3), **kwargs)
    return None


def local_or(fs: pafs.FileSystem | None) -> pafs.FileSystem:
    return fs or pafs.LocalFileSystem()


def strip_scheme(path: str) -> str:
    """pyarrow filesystems take ``bucket/key`` rather than ``s3://bucket/key``."""
    parsed = urlparse(path)
    return f"{parsed.netloc}{parsed.path}" if parsed.scheme in ("s3", "s3a") else path


def ray_path(path: str) -> str:
    """What Ray Data's readers and writers take: a URI as is, a local path made absolute
    (the workers' working directory is not the driver's)."""
    return path if is_uri(path) else os.path.abspath(path)


def fs_path(path: str) -> str:
    """What a pyarrow filesystem takes: ``bucket/key`` for URIs, an absolute local path."""
    return strip_scheme(path) if is_uri(path) else os.path.abspath(path)


def join(path: str, name: str) -> str:
    """``path``/``name`` for a local path or a URI."""
    return f"{path.rstrip('/')}/{name}"


def is_transient(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and any(
        t in text for t in TRANSIENT_ERRORS
    )


def retrying(fn: Callable[[], T], what: str, storage: StorageConfig | None = None) -> T:
    """``fn()``, retried on transient storage errors with exponential backoff (1 s, 2 s, ...
    capped at ``retry_max_backoff_s``) up to ``retry_attempts`` times; then ``StorageError``."""
    storage = storage or StorageConfig()
    for attempt in range(1, storage.retry_attempts + 1):
        try:
            return fn()
        except OSError as e:
            if not is_transient(e):
                raise
            if attempt == storage.retry_attempts:
                raise StorageError(f"{what}: still failing after {attempt} attempts: {e}") from e
            wait = min(storage.retry_max_backoff_s, 2.0 ** (attempt - 1))
            log.warning("%s: transient storage error (attempt %d of %d), retrying in %.0f s: %s",
                        what, attempt, storage.retry_attempts, wait, e)
            time.sleep(wait)
    raise AssertionError("unreachable")


def has_files(path: str, storage: StorageConfig | None = None) -> bool:
    """Whether ``path`` (local or URI) is a directory holding at least one file."""
    fs, target = local_or(filesystem_for(path, storage)), fs_path(path)

    def probe() -> bool:
        if fs.get_file_info(target).type != pafs.FileType.Directory:
            return False
        infos = fs.get_file_info(pafs.FileSelector(target, recursive=True))
        return any(i.type == pafs.FileType.File for i in infos)

    return retrying(probe, f"listing {path}", storage)


def delete_dir(path: str, storage: StorageConfig | None = None) -> None:
    """Delete ``path`` and everything under it, if it exists."""
    fs, target = local_or(filesystem_for(path, storage)), fs_path(path)

    def delete() -> None:
        if fs.get_file_info(target).type == pafs.FileType.Directory:
            fs.delete_dir(target)

    retrying(delete, f"deleting {path}", storage)


def parquet_dataset(path: str, storage: StorageConfig | None = None, files: list[str] | None = None) -> pads.Dataset:
    """A pyarrow view of the Parquet files under ``path`` (files and folders starting with ``_``
    or ``.`` are skipped: the manifest, the checkpoint), or of ``files`` (relative to ``path``)
    only: schema and row counts come from the file footers, without reading the data."""
    source = [join(fs_path(path), f) for f in files] if files is not None else fs_path(path)
    return retrying(
        lambda: pads.dataset(source, filesystem=filesystem_for(path, storage), format="parquet"),
        f"listing {path}", storage,
    )
