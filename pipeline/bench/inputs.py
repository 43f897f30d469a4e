"""Benchmark: what reading a prefix of image files costs the driver before any model work, and
what a scheduled (``--incremental``) run's bookkeeping costs, against the number of files.

    python -m pipeline.bench.inputs [--local 1000,10000,100000] [--s3 1000,4000,16000]
                                    [--ledger 100000,1000000,4000000] [--runs 30]

- ``list_local``: ``formats.list_files`` over N files in a local tree (100 files a folder).
- ``list_s3``: the same over N objects on an S3 server (moto on 127.0.0.1, in this process):
  the client pages through ListObjectsV2, 1,000 keys a page, as against AWS S3.
- ``ledger``: a scheduled run over N files taken by ``--runs`` earlier runs plus 1 % new ones:
  staging a run's listing (one Parquet file), reading every earlier run's listing column back
  (``runs.taken_files``) and the set difference (``runs.unseen``).

Each figure is the median of 3 runs (listing: the files are made once); per-file costs are the
slope between the smallest and largest N, and the table extrapolates them to 10 million files.
Ends with one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from pipeline.config import InputConfig
from pipeline.io import formats
from pipeline.io.inputs import InputPlan, stage_listing
from pipeline.io.runs import taken_files, unseen
from pipeline.io.storage import Location, locate

EXTENSIONS = InputConfig(path="x").extensions
PER_FOLDER = 100
TARGET = 10_000_000


def _median(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _key(i: int) -> str:
    return f"2026/{i // (PER_FOLDER * 30) % 12 + 1:02d}/{i // PER_FOLDER:06d}/IMG_{i:08d}.jpg"


def list_local(n: int, work: Path) -> float:
    root = work / f"local-{n}"
    for i in range(n):
        path = root / _key(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    location = locate(str(root))
    assert formats.list_files([location], EXTENSIONS).num_rows == n
    return _median(lambda: formats.list_files([location], EXTENSIONS))


def list_s3(sizes: list[int]) -> dict[int, float]:
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "AKIAFAKEKEY7Q2ZX", "AWS_SECRET_ACCESS_KEY": "fake-secret-5f1e9c0b7a",
                       "AWS_REGION": "us-east-1"})
    endpoint = f"http://127.0.0.1:{port}"
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        out = {}
        for n in sizes:
            bucket = f"bench-{n}"
            s3.create_bucket(Bucket=bucket)
            for i in range(n):
                s3.put_object(Bucket=bucket, Key=f"photos/{_key(i)}", Body=b"x")
            location = Location(f"s3://{bucket}/photos", endpoint=endpoint, region="us-east-1")
            assert formats.list_files([location], EXTENSIONS).num_rows == n
            out[n] = _median(lambda loc=location: formats.list_files([loc], EXTENSIONS))
        return out
    finally:
        server.stop()


def ledger(n: int, runs: int, work: Path) -> dict[str, float]:
    """Seconds to stage one run's listing, read ``runs`` earlier listings and diff N + 1 % files."""
    refs = [f"s3://corpus/photos/{_key(i)}" for i in range(n + n // 100)]
    listing = pa.table({"id": pa.array([r[len("s3://corpus/photos/"):-4] for r in refs], pa.string()),
                        "image": pa.array(refs, pa.string())})
    per_run = -(-n // runs)
    roots = []
    for r in range(runs):
        out = locate(str(work / f"ledger-{n}" / f"run-{r:03d}"))
        part = listing.slice(r * per_run, min(per_run, n - r * per_run))
        plan = InputPlan(files=[], rows=part.num_rows, format="files", listing=part)
        stage_listing(plan, out)
        roots.append(out)
    last = InputPlan(files=[], rows=per_run, format="files", listing=listing.slice(0, per_run))
    scratch = locate(str(work / f"ledger-{n}" / "scratch"))

    def stage() -> None:
        (work / f"ledger-{n}" / "scratch").mkdir(parents=True, exist_ok=True)
        for f in (work / f"ledger-{n}" / "scratch").rglob("*.parquet"):
            f.unlink()
        stage_listing(last, scratch)

    taken = taken_files(roots)
    assert unseen(listing, taken).num_rows == n // 100
    return {"stage_s": _median(stage), "read_s": _median(lambda: taken_files(roots)),
            "diff_s": _median(lambda: unseen(listing, taken))}


def _slope(figures: dict[int, float]) -> float:
    lo, hi = min(figures), max(figures)
    return (figures[hi] - figures[lo]) / (hi - lo)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--local", default="1000,10000,100000")
    p.add_argument("--s3", default="1000,4000,16000")
    p.add_argument("--ledger", default="100000,1000000,4000000")
    p.add_argument("--runs", type=int, default=30, help="earlier runs the taken files are spread over")
    a = p.parse_args()
    sizes = {k: [int(x) for x in getattr(a, k).split(",") if x] for k in ("local", "s3", "ledger")}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        local = {n: list_local(n, work) for n in sizes["local"]}
        s3 = list_s3(sizes["s3"]) if sizes["s3"] else {}
        books = {n: ledger(n, a.runs, work) for n in sizes["ledger"]}
    print(f"{'what':<34}{'files':>12}{'seconds':>10}{'us/file':>10}")
    for name, figures in (("list a local tree", local), ("list an S3 prefix (moto)", s3)):
        for n, s in figures.items():
            print(f"{name:<34}{n:>12,}{s:>10.3f}{1e6 * s / n:>10.2f}")
    for n, f in books.items():
        for part, s in f.items():
            print(f"{'ledger: ' + part:<34}{n:>12,}{s:>10.3f}{1e6 * s / n:>10.3f}")
    result = {
        "list_local_us_per_file": round(1e6 * _slope(local), 3) if len(local) > 1 else None,
        "list_s3_moto_us_per_file": round(1e6 * _slope(s3), 3) if len(s3) > 1 else None,
        "ledger_us_per_file": {part: round(1e6 * _slope({n: f[part] for n, f in books.items()}), 4)
                               for part in ("stage_s", "read_s", "diff_s")} if len(books) > 1 else None,
        "runs": a.runs,
        "seconds": {"local": local, "s3": s3, "ledger": books},
    }
    if result["list_local_us_per_file"] is not None and result["ledger_us_per_file"]:
        ledger_us = sum(result["ledger_us_per_file"].values())
        result["extrapolated_10M_s"] = {"list_local": round(result["list_local_us_per_file"] * TARGET / 1e6, 1),
                                        "ledger": round(ledger_us * TARGET / 1e6, 1)}
        if result["list_s3_moto_us_per_file"] is not None:
            result["extrapolated_10M_s"]["list_s3_moto"] = round(result["list_s3_moto_us_per_file"] * TARGET / 1e6, 1)
        print(f"extrapolated to {TARGET:,} files: {result['extrapolated_10M_s']} seconds")
    print("RESULT " + json.dumps(result, default=str))


if __name__ == "__main__":
    main()
