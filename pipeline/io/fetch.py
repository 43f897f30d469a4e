"""Images read by reference: a path or URI per row, read through the storage layer.

Used by ``input.format: files`` (the listing's paths) and by Parquet rows whose
``input.image_column`` holds references. Each read goes through ``Location.retrying`` (bounded
retries on transient errors), reads at most ``max_bytes + 1`` bytes, and runs with at most
``concurrency`` reads in flight per batch. A row whose object is missing, unreadable or too large
keeps ``image`` null and says why in ``image_error`` (the preparation stage makes it the row's
error); only a storage that still fails after its retries stops the run (``StorageError``), so
an outage is resumed, not written as a corpus of error rows.

This module imports without Ray.
"""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from pipeline.config import InputConfig, StorageConfig

from .storage import Location, StorageError, is_uri, locate

# The internal column a reader sets when it could not give a row its image (pipeline.io.schema.DROPPED).
IMAGE_ERROR = "image_error"


@dataclass(frozen=True)
class ObjectReader:
    """Reads references as bytes; resolved once in the driver (picklable, shipped to the tasks)."""

    remote: Location  # any URI is read with its endpoint, region and retry policy
    local: Location  # local paths: the retry policy
    root: Location | None = None  # relative references are read under it (None: they are errors)
    max_bytes: int = 64 * 2**20
    concurrency: int = 16

    def location(self, ref: str) -> Location | str:
        """The ``Location`` of ``ref``, or why there is none."""
        if is_uri(ref):
            return self.remote.with_uri(ref)
        if posixpath.isabs(ref):
            return self.local.with_uri(ref)
        if self.root is None:
            return f"missing image: reference {ref[:200]!r} is neither a URI nor an absolute path (set input.image_root)"
        return self.root.child(ref)

    def read(self, ref: object) -> tuple[bytes | None, str]:
        """``(bytes, "")`` or ``(None, "<kind>: <detail>")`` for one reference."""
        if not isinstance(ref, str) or not ref:
            return None, "missing image: no reference"
        where = self.location(ref)
        if isinstance(where, str):
            return None, where
        fs, path, limit = where.fs, where.path, self.max_bytes

        def get() -> bytes:
            with fs.open_input_stream(path) as f:
                return f.read(limit + 1)

        try:
            data = where.retrying(get, f"reading {where.uri}")
        except StorageError:
            raise
        except FileNotFoundError:
            return None, f"missing image: not found: {where.uri[:300]}"
        except OSError as e:  # permanent: permission, a directory, a bad bucket name
            return None, f"missing image: unreadable: {where.uri[:300]}: {str(e)[:200]}"
        if len(data) > limit:
            return None, f"image too large: {where.uri[:300]} is over input.max_image_bytes = {limit} bytes"
        return data, ""


def fetch_images(batch: pa.Table, reader: ObjectReader, column: str) -> pa.Table:
    """Ray Data map (Arrow batches): ``image`` (binary, null when unread) and ``image_error``
    from the references in ``column``, which stays (an input column passes through to the
    output) unless it is ``image`` itself."""
    refs = batch.column(column).to_pylist()
    with ThreadPoolExecutor(max_workers=max(1, min(reader.concurrency, len(refs)))) as pool:
        results = list(pool.map(reader.read, refs))
    images = pa.array([data for data, _ in results], pa.binary())
    errors = pa.array([error for _, error in results], pa.string())
    if "image" in batch.column_names:
        batch = batch.drop_columns(["image"])
    return batch.append_column("image", images).append_column(IMAGE_ERROR, errors)


def object_reader(storage: StorageConfig, inputs: InputConfig) -> ObjectReader:
    """The reader for ``inputs``' references, resolved once (endpoints, region, retries)."""
    root = locate(inputs.image_root, storage) if inputs.image_root else None
    return ObjectReader(locate("s3://", storage), locate("/", storage), root, inputs.max_image_bytes,
                        inputs.fetch_concurrency)
