"""Paths and URIs: local directories or S3-compatible object storage."""

from __future__ import annotations

import os
from urllib.parse import urlparse

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
