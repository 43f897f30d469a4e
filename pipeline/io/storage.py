"""Where the job reads and writes: local directories or S3-compatible object storage, each
resolved ONCE into a ``Location`` that every reader and writer takes.

A ``Location`` holds the path as configured, the pyarrow filesystem for it, the path forms Ray
Data and pyarrow take, and the retry policy (``storage``). S3 goes through
``pyarrow.fs.S3FileSystem``: the endpoint is ``storage.endpoint_url`` or ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` (MinIO, moto, ...), credentials come from the standard AWS chain
(environment, profile, instance or pod role) and are never passed, logged or stored by this
package. Every storage call the driver makes goes through ``Location.retrying``: bounded attempts
with exponential backoff on the transient errors Ray Data itself retries.

This module imports without Ray (model sources use it on any node).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline.config import StorageConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
S3_SCHEMES = ("s3", "s3a")
# Transient, besides Ray Data's own list (AWS throttling, network, 5xx): what a refused or dropped
# connection says through pyarrow's S3 client.
CONNECTION_ERRORS = ("Couldn't connect to server", "Connection refused", "curlCode: 7")


class StorageError(OSError):
    """A storage call that still failed after its retries (or failed permanently)."""


def is_uri(path: str) -> bool:
    return "://" in path


@functools.cache
def transient_errors() -> tuple[str, ...]:
    # Ray's list, imported on first use: the module itself must not need Ray.
    from ray.data.context import DEFAULT_RETRIED_IO_ERRORS

    return (*DEFAULT_RETRIED_IO_ERRORS, *CONNECTION_ERRORS)


def is_transient(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and any(
        t in text for t in transient_errors()
    )


@dataclass(frozen=True)
class Location:
    """A local path or an S3 URI with what it takes to reach it; picklable (Ray ships it to
    workers). Build one with ``locate``; derive others with ``child``."""

    uri: str  # as configured: a local path (relative paths stay relative) or s3://bucket/key
    endpoint: str | None = None  # S3 only: resolved once from storage.endpoint_url or the environment
    region: str | None = None
    retry_attempts: int = StorageConfig().retry_attempts
    retry_max_backoff_s: float = StorageConfig().retry_max_backoff_s

    @property
    def is_remote(self) -> bool:
        return is_uri(self.uri)

    @property
    def arrow_filesystem(self) -> pafs.FileSystem | None:
        """The filesystem Ray Data's ``filesystem=`` takes: None for a local path (inferred)."""
        if urlparse(self.uri).scheme not in S3_SCHEMES:
            return None
        kwargs = {k: v for k, v in (("endpoint_override", self.endpoint), ("region", self.region)) if v}
        # The client's own retries are the first line; `retrying` and Ray Data's write retries wrap it.
        return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3), **kwargs)

    @property
    def fs(self) -> pafs.FileSystem:
        return self.arrow_filesystem or pafs.LocalFileSystem()

    @property
    def path(self) -> str:
        """What a pyarrow filesystem takes: ``bucket/key`` for a URI, an absolute local path."""
        if self.is_remote:
            parsed = urlparse(self.uri)
            return f"{parsed.netloc}{parsed.path}"
        return os.path.abspath(self.uri)

    @property
    def ray_path(self) -> str:
        """What Ray Data's readers and writers take: a URI as is, a local path made absolute
        (the workers' working directory is not the driver's)."""
        return self.uri if self.is_remote else os.path.abspath(self.uri)

    def child(self, name: str) -> Location:
        """``self``/``name``, on the same storage."""
        return self.with_uri(f"{self.uri.rstrip('/')}/{name}")

    def with_uri(self, uri: str) -> Location:
        return Location(uri, self.endpoint, self.region, self.retry_attempts, self.retry_max_backoff_s)

    def ray_file(self, fs_file: str) -> str:
        """A file under this location as the filesystem lists it -> as Ray takes it."""
        return f"{urlparse(self.uri).scheme}://{fs_file}" if self.is_remote else fs_file

    def retrying(self, fn: Callable[[], T], what: str) -> T:
        """``fn()``, retried on transient storage errors with exponential backoff (1 s, 2 s, ...
        capped at ``retry_max_backoff_s``) up to ``retry_attempts`` times; then ``StorageError``."""
        for attempt in range(1, self.retry_attempts + 1):
            try:
                return fn()
            except OSError as e:
                if not is_transient(e):
                    raise
                if attempt == self.retry_attempts:
                    raise StorageError(f"{what}: still failing after {attempt} attempts: {e}") from e
                wait = min(self.retry_max_backoff_s, 2.0 ** (attempt - 1))
                log.warning("%s: transient storage error (attempt %d of %d), retrying in %.0f s: %s",
                            what, attempt, self.retry_attempts, wait, e)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def has_files(self) -> bool:
        """Whether this is a directory holding at least one file."""
        fs, target = self.fs, self.path

        def probe() -> bool:
            if fs.get_file_info(target).type != pafs.FileType.Directory:
                return False
            infos = fs.get_file_info(pafs.FileSelector(target, recursive=True))
            return any(i.type == pafs.FileType.File for i in infos)

        return self.retrying(probe, f"listing {self.uri}")

    def list_dir(self) -> list[pafs.FileInfo]:
        """The entries directly under this directory ([] when it does not exist)."""
        fs, target = self.fs, self.path
        return self.retrying(lambda: fs.get_file_info(pafs.FileSelector(target, allow_not_found=True)),
                             f"listing {self.uri}")

    def delete_dir(self) -> None:
        """Delete this directory and everything under it, if it exists."""
        fs, target = self.fs, self.path

        def delete() -> None:
            if fs.get_file_info(target).type == pafs.FileType.Directory:
                fs.delete_dir(target)

        self.retrying(delete, f"deleting {self.uri}")

    def parquet_dataset(self, files: list[str] | None = None) -> pads.Dataset:
        """A pyarrow view of the Parquet files under this location (files and folders starting
        with ``_`` or ``.`` are skipped: the manifest, the checkpoint), or of ``files`` (relative
        to it) only: schema and row counts come from the file footers, without reading the data."""
        source = [f"{self.path.rstrip('/')}/{f}" for f in files] if files is not None else self.path
        return self.retrying(lambda: pads.dataset(source, filesystem=self.arrow_filesystem, format="parquet"),
                             f"listing {self.uri}")


def locate(path: str, storage: StorageConfig | None = None) -> Location:
    """``path`` resolved once: its endpoint and region (S3) from ``storage`` or the environment,
    and the retry policy of ``storage``."""
    storage = storage or StorageConfig()
    endpoint = region = None
    if urlparse(path).scheme in S3_SCHEMES:
        endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return Location(path, endpoint, region, storage.retry_attempts, storage.retry_max_backoff_s)
