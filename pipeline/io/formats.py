"""The corpus shapes the job reads (``input.format``), listed in the driver and read by Ray Data.

- ``parquet``: rows holding ``id``, the image (bytes in ``image``, or a reference in
  ``input.image_column`` that the fetch step reads) and the prompt. Listed and checked by
  ``pipeline.io.inputs.check_input``.
- ``files``: every image file under one or more prefixes. The driver lists them once
  (``list_files``); the id is the key relative to its prefix without the image extension, so a
  file and the same image in a tar shard have the same id. The listing is staged under the run's
  output (``_input/listing.parquet``), read back with ``read_parquet`` (Ray's checkpoint filter
  then skips committed ids) and fetched by ``pipeline.io.fetch``; a resume reads the staged
  listing, never the prefix, so a run's files are fixed at its first attempt.
- ``webdataset``: tar shards (``key.jpg``, ``key.txt``, ``key.json``, ...). The driver reads every
  shard's members once (``index_shards``: ids, text columns, truncation), staged like a listing;
  Ray Data reads the samples with ``TarShards``, a ``FileBasedDatasource``. Ray's own
  ``read_webdataset`` fails the whole shard on a truncated member; here the samples before it are
  read and the truncated sample becomes an error row.

This module imports without Ray; ``TarShards`` and ``read_input`` import it when called.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import re
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from .storage import Location

log = logging.getLogger(__name__)
LISTING_ROW_GROUP = 256  # rows per read block: reads of a long listing spread over the cluster
TAR_EXTENSION = ".tar"
# WebDataset's key rule (Ray's read_webdataset's): the member's path up to the first dot of its base name.
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
SCAN_THREADS = 8


def _visible(relative: str) -> bool:
    """Names starting with ``_`` or ``.`` are skipped at every level (the manifest, the checkpoint,
    staging, editor and OS files), as the Parquet reader skips them."""
    return not any(part.startswith(("_", ".")) for part in relative.split("/"))


def _relative(root: Location, fs_path: str) -> str:
    prefix = root.path.rstrip("/") + "/"
    return fs_path[len(prefix):] if fs_path.startswith(prefix) else fs_path


def image_extension(name: str, extensions: tuple[str, ...]) -> str | None:
    """The image extension ``name`` ends with (lower case, without the dot), if any."""
    ext = posixpath.splitext(name)[1].lower().lstrip(".")
    return ext if ext in extensions else None


# --- files -------------------------------------------------------------------------------------


def list_files(roots: list[Location], extensions: tuple[str, ...]) -> pa.Table:
    """Every image file under ``roots`` (in root order, then path order) as ``id`` (the key
    relative to its root, without the image extension) and ``image`` (the reference the fetch
    step reads: a URI, or an absolute local path)."""
    ids: list[str] = []
    refs: list[str] = []
    for root in roots:
        fs, target = root.fs, root.path

        def listing(fs: pafs.FileSystem = fs, target: str = target) -> list[pafs.FileInfo]:
            if fs.get_file_info(target).type != pafs.FileType.Directory:
                return []
            return fs.get_file_info(pafs.FileSelector(target, recursive=True))

        infos = root.retrying(listing, f"listing {root.uri}")
        for path in sorted(i.path for i in infos if i.type == pafs.FileType.File):
            relative = _relative(root, path)
            ext = image_extension(relative, extensions)
            if ext is None or not _visible(relative):
                continue
            ids.append(relative[: -len(ext) - 1])
            refs.append(root.ray_file(path))
    return pa.table({"id": pa.array(ids, pa.string()), "image": pa.array(refs, pa.string())})


# --- webdataset --------------------------------------------------------------------------------


@dataclass
class Sample:
    """One tar sample: its members grouped by key (contiguous, as WebDataset requires)."""

    key: str
    image: bytes | None = None
    image_member: str = ""
    texts: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes, non-image members
    error: str = ""


def split_member(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member name, None when it has no extension."""
    match = _KEY.match(name)
    return (match.group(1), match.group(2)) if match else None


class _Tail:
    """A read-only stream that remembers its last ``END_BLOCKS`` bytes: a whole tar ends with
    zero blocks, which Python's tarfile reads as the end without saying whether they were there."""

    END_BLOCKS = 2 * tarfile.BLOCKSIZE

    def __init__(self, stream: io.RawIOBase) -> None:
        self.stream, self.tail = stream, b""

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.tail = (self.tail + data)[-self.END_BLOCKS:]
        return data

    def ended_whole(self) -> bool:
        """Read to the end; whether the stream ended with the tar end-of-archive blocks."""
        while self.read(1 << 20):
            pass
        return len(self.tail) == self.END_BLOCKS and not self.tail.strip(b"\0")


def tar_samples(stream: io.RawIOBase, extensions: tuple[str, ...], shard: str, keep_images: bool = True) -> Iterator[Sample]:
    """The samples of a tar stream, in member order. A shard cut short ends where it is cut (a
    tar has no index to resume from): the sample being read then is yielded with ``error`` set
    (it may lack members), then one keyless ``Sample`` saying where the shard ended.
    ``keep_images`` False: image bytes are read and dropped (text members are kept: they are small)."""
    tail = _Tail(stream)
    try:
        archive = tarfile.open(fileobj=tail, mode="r|")
    except tarfile.ReadError as e:
        yield Sample(key="", error=f"corrupt image: {shard} is not a readable tar: {e}")
        return
    members, current, last = iter(archive), None, ""
    cut = ""
    while True:
        try:
            member = next(members)
        except StopIteration:
            break
        except tarfile.ReadError as e:  # a damaged header
            cut = str(e)
            break
        if not member.isreg():
            continue
        parts = split_member(member.name)
        if parts is None:
            continue
        key, ext = parts
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = Sample(key=key)
        try:
            data = archive.extractfile(member).read()
            if len(data) != member.size:
                raise tarfile.ReadError("unexpected end of data")
        except (tarfile.ReadError, OSError, EOFError) as e:
            current.image, current.error = None, f"corrupt image: {shard}: member {member.name} is cut short ({e})"
            yield current
            yield Sample(key="", error=f"{shard}: cut short in member {member.name}: nothing after it is read")
            return
        last = member.name
        if image_extension(member.name, extensions):
            if not current.image_member:
                current.image_member, current.image = member.name, data if keep_images else None
        else:
            current.texts[ext.lower()] = data
    if cut or not tail.ended_whole():
        if current is not None:
            current.image = None
            current.error = f"corrupt image: {shard} is cut short after member {last}: this sample may lack members"
            yield current
        why = cut or "no end-of-archive blocks"
        yield Sample(key="", error=f"{shard}: cut short after member {last or '(none)'} ({why}): nothing after it is read")
        return
    if current is not None:
        yield current


@dataclass
class ShardIndex:
    """What ``index_shards`` found: one row per sample, and the text columns."""

    table: pa.Table  # id, shard (relative), error ("" when readable)
    text_columns: list[str]  # non-image member extensions whose bytes are always UTF-8
    left_out: list[str]  # extensions left out: some member was not UTF-8 text
    problems: list[str]  # shards with an unreadable tail, one line each
    empty_shards: list[str]  # shards without a readable sample (taken all the same)

    def to_table(self) -> pa.Table:
        """The index as one table (what is staged); the lists ride in its schema metadata."""
        meta = {k: json.dumps(getattr(self, k)) for k in ("text_columns", "left_out", "problems", "empty_shards")}
        return self.table.replace_schema_metadata(meta)

    @classmethod
    def from_table(cls, table: pa.Table) -> ShardIndex:
        meta = {k.decode(): json.loads(v) for k, v in (table.schema.metadata or {}).items()}
        return cls(table.replace_schema_metadata(None), meta["text_columns"], meta["left_out"], meta["problems"],
                   meta["empty_shards"])


def index_shards(root: Location, shards: list[str], extensions: tuple[str, ...]) -> ShardIndex:
    """Read every shard once (bounded threads): its samples' keys, which text members they have,
    and where a shard is cut short. Costs one read of the corpus; a resume reuses the index."""

    def scan(shard: str) -> tuple[list[tuple[str, str]], dict[str, bool], list[str]]:
        where = root.child(shard)

        def read() -> tuple[list[tuple[str, str]], dict[str, bool], list[str]]:
            rows, utf8, problems = [], {}, []
            with where.fs.open_input_stream(where.path) as f:
                for sample in tar_samples(f, extensions, shard, keep_images=False):
                    if not sample.key:
                        problems.append(sample.error)
                        continue
                    rows.append((sample.key, sample.error))
                    for ext, data in sample.texts.items():
                        utf8[ext] = utf8.get(ext, True) and _is_utf8(data)
            return rows, utf8, problems

        return where.retrying(read, f"reading {where.uri}")

    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
        scanned = list(pool.map(scan, shards))
    ids, shard_of, errors, utf8_all, problems = [], [], [], {}, []
    for shard, (rows, utf8, shard_problems) in zip(shards, scanned, strict=True):
        for key, error in rows:
            ids.append(key)
            shard_of.append(shard)
            errors.append(error)
        for ext, ok in utf8.items():
            utf8_all[ext] = utf8_all.get(ext, True) and ok
        problems += shard_problems
    table = pa.table({"id": pa.array(ids, pa.string()), "shard": pa.array(shard_of, pa.string()),
                      "error": pa.array(errors, pa.string())})
    return ShardIndex(table, sorted(e for e, ok in utf8_all.items() if ok),
                      sorted(e for e, ok in utf8_all.items() if not ok), problems,
                      [s for s, (rows, _, _) in zip(shards, scanned, strict=True) if not rows])


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def list_tar_shards(root: Location) -> list[str]:
    """The ``.tar`` files under ``root``, relative to it, in path order (``_``/``.`` names skipped)."""
    fs, target = root.fs, root.path

    def listing() -> list[pafs.FileInfo]:
        if fs.get_file_info(target).type != pafs.FileType.Directory:
            return []
        return fs.get_file_info(pafs.FileSelector(target, recursive=True))

    infos = root.retrying(listing, f"listing {root.uri}")
    found = [_relative(root, i.path) for i in infos if i.type == pafs.FileType.File and i.path.endswith(TAR_EXTENSION)]
    return sorted(f for f in found if _visible(f))


def tar_shards_datasource(root: Location, files: list[str], extensions: tuple[str, ...], text_columns: list[str],
                          skip: dict[str, list[str]]):  # -> TarShards (a Ray Data datasource)
    """``TarShards`` over ``files`` (shards under ``root`` as its filesystem names them), each
    shard read by ``shard_rows``. ``skip``: keys per shard (relative) that the id policy dropped."""
    from ray.data.datasource import FileBasedDatasource

    prefix = root.path.rstrip("/") + "/"

    class TarShards(FileBasedDatasource):
        _FILE_EXTENSIONS = ["tar"]

        def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
            shard = path[len(prefix):] if path.startswith(prefix) else path
            yield from shard_rows(f, shard, extensions, text_columns, frozenset(skip.get(shard, ())))

    return TarShards([root.ray_file(f) for f in files], filesystem=root.arrow_filesystem,
                     schema=shard_schema(text_columns))


TAR_BLOCK_ROWS = 64  # rows per block a shard read yields (a shard of 10k images is not one block)


def shard_schema(text_columns: list[str]) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("image", pa.binary()), ("image_error", pa.string()),
                      *((c, pa.string()) for c in text_columns)])


def shard_rows(stream: io.RawIOBase, shard: str, extensions: tuple[str, ...], text_columns: list[str],
               skip: frozenset[str] = frozenset()) -> Iterator[pa.Table]:
    """One shard's rows in blocks: ``id``, ``image`` (bytes; null on an error row),
    ``image_error`` and one string column per text extension. Keys in ``skip`` and a key's later
    samples in the shard are left out (the id policy kept another)."""
    schema, seen, rows = shard_schema(text_columns), set(), []
    for sample in tar_samples(stream, extensions, shard):
        if not sample.key or sample.key in skip or sample.key in seen:
            continue  # a cut shard's note (the plan reported it); a dropped repeat
        seen.add(sample.key)
        error = sample.error or ("" if sample.image_member else "missing image: no member with an image "
                                 f"extension ({', '.join(extensions)}) for key {sample.key} in {shard}")
        rows.append({"id": sample.key, "image": None if error else sample.image, "image_error": error,
                     **{c: _text(sample.texts.get(c)) for c in text_columns}})
        if len(rows) >= TAR_BLOCK_ROWS:
            yield pa.Table.from_pylist(rows, schema=schema)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=schema)


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8")


def add_prompt(batch: pa.Table, prompt: str) -> pa.Table:
    """Ray Data map: every row's prompt is ``input.prompt`` (an input without a prompt column)."""
    return batch.append_column("prompt", pa.array([prompt] * batch.num_rows, pa.string()))
