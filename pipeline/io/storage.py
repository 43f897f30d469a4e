"""Paths and URIs: local directories or S3-compatible object storage."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import pyarrow.dataset as pads
import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def filesystem_for(path: str) -> pafs.FileSystem | None:
    """A pyarrow filesystem for ``path``: S3 honours ``AWS_ENDPOINT_URL`` (MinIO, moto, ...);
    credentials come from the standard AWS chain and are never logged. None: let pyarrow infer."""
    scheme = urlparse(path).scheme
    if scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {"endpoint_override": endpoint} if endpoint else {}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs)
    return None


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


def has_files(path: str) -> bool:
    """Whether ``path`` (local or URI) is a directory holding at least one file."""
    fs = filesystem_for(path) or pafs.LocalFileSystem()
    target = fs_path(path)
    if fs.get_file_info(target).type != pafs.FileType.Directory:
        return False
    infos = fs.get_file_info(pafs.FileSelector(target, recursive=True))
    return any(i.type == pafs.FileType.File for i in infos)


def parquet_dataset(path: str) -> pads.Dataset:
    """A pyarrow view of the Parquet files under ``path``: schema and row counts come from the
    file footers, without reading the data."""
    return pads.dataset(fs_path(path), filesystem=filesystem_for(path), format="parquet")
