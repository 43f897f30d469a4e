"""Every input format through the Ray job: the same rows as Parquet bytes, as image files under a
prefix (local and on the S3 test server), as WebDataset tar shards and as Parquet rows naming
their images get the same ids and answers; damaged inputs become error rows; a scheduled run
over a growing prefix takes only new files, finishing a killed run first, every file once.

The killed-run test goes first, through the command line (its own Ray); the others share one
Ray instance in this process (as tests/test_families.py does)."""

from __future__ import annotations

import io
import os
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import load_config
from pipeline.io.manifest import read_manifest
from pipeline.io.storage import locate
from pipeline.job import run_job
from pipeline.tiny.shapes_world import CAPTION_PROMPT, REFERENCE_COLUMN, SCHEMA, make_rows, write_corpus

from .conftest import REPO, free_port
from .test_resilience import _cli, _config, kill_mid_run

ROWS = 8
CREDS = {"AWS_ACCESS_KEY_ID": "AKIAFAKEKEY7Q2ZX", "AWS_SECRET_ACCESS_KEY": "fake-secret-5f1e9c0b7a",
         "AWS_REGION": "us-east-1"}


def _ids_by_run(root: Path) -> Counter:
    return Counter(pads.dataset(root, format="parquet").to_table(columns=["id"]).column("id").to_pylist())


def test_scheduled_runs_over_a_growing_prefix_take_new_files_and_finish_a_killed_run_first(
    tmp_path: Path, tiny_llava: str
) -> None:
    photos, root = tmp_path / "photos", tmp_path / "runs"
    write_corpus(photos, rows=4, seed=41, types=("caption",), fmt="files")
    # Two files per fetch (blocks of two rows): writes commit one by one, so the kill lands mid-run.
    cfg = _config(tmp_path, input={"format": "files", "prompt": CAPTION_PROMPT, "fetch_concurrency": 2},
                  text_stage={"batch_size": 2},
                  encode_stage={"batch_size": 2}, decode_stage={"batch_size": 2})
    args = ["--config", str(cfg), "--input", str(photos), "--output", str(root), "--incremental"]
    rc, summary, log = _cli(args)
    assert rc == 0 and summary["output_rows"] == summary["ok_rows"] == 4, log
    first = {p.name for p in root.glob("run-*")}

    write_corpus(photos / "day2", rows=12, seed=42, types=("caption",), fmt="files")  # lands the next day
    kill_mid_run(args, root, "run-*", frozenset(first))
    (killed,) = {p.name for p in root.glob("run-*")} - first
    assert read_manifest(locate(str(root / killed)))["status"] == "running"
    assert 0 < sum(_ids_by_run(root / killed).values()) < 12

    write_corpus(photos / "day3", rows=2, seed=43, types=("caption",), fmt="files")  # lands while it is down
    rc, summary, log = _cli(args)  # the killed run first, with its own files only
    assert rc == 0 and summary["output"].endswith(killed) and summary["output_rows"] == 12, log
    assert summary["skipped_already_done"] > 0
    ids = _ids_by_run(root / killed)
    assert len(ids) == 12 and max(ids.values()) == 1 and all(i.startswith("day2/") for i in ids)

    rc, summary, log = _cli(args)  # then only what landed since
    assert rc == 0 and summary["output_rows"] == 2, log
    manifest = read_manifest(locate(summary["output"]))
    assert manifest["input"]["format"] == "files" and manifest["input"]["listing"] == "_input/listing.parquet"
    assert manifest["incremental"] == {"root": str(root), "resumed": False, "earlier_runs": 2, "files_taken_before": 16}
    every = _ids_by_run(root)
    assert len(every) == 18 and max(every.values()) == 1  # each file once, over all runs


@pytest.fixture(scope="module")
def s3_endpoint() -> object:
    """moto's S3 server on 127.0.0.1, and the credentials in this process's environment before
    Ray starts (its workers inherit them)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in CREDS}
    os.environ.update(CREDS)
    yield f"http://127.0.0.1:{port}"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def local_ray(s3_endpoint: str) -> object:
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False)
    yield
    ray.shutdown()


def _job(tmp_path: Path, name: str, path: object, endpoint: str, **input_fields: object) -> dict:
    raw = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    raw["input"].pop("create_sample_rows")
    raw["input"] |= {"path": path, **input_fields}
    raw["output"] = {"path": str(tmp_path / "out" / name), "max_rows_per_file": 4}
    raw["generation"]["max_new_tokens"] = 8
    raw["storage"] = {"endpoint_url": endpoint}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    summary = run_job(load_config(tmp_path / f"{name}.yaml")).as_dict()
    rows = pads.dataset(tmp_path / "out" / name, format="parquet").to_table().to_pylist()
    return {"summary": summary, "rows": {r["id"]: r for r in rows}, "count": Counter(r["id"] for r in rows)}


def _upload(s3: object, folder: Path, bucket: str, prefix: str) -> None:
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(folder).as_posix()}")


def test_the_same_rows_in_every_format_get_the_same_ids_and_answers(
    tmp_path: Path, tiny_llava: str, s3_endpoint: str, local_ray: None
) -> None:
    import boto3

    corpus = {fmt: write_corpus(tmp_path / fmt, rows=ROWS, seed=44, types=("caption",), fmt=fmt)
              for fmt in ("parquet", "files", "webdataset", "parquet-refs")}
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                      aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket="photos")
    _upload(s3, corpus["files"], "photos", "shapes")
    prompt = {"prompt": CAPTION_PROMPT}
    runs = {
        "parquet": _job(tmp_path, "parquet", str(corpus["parquet"]), s3_endpoint),
        "files": _job(tmp_path, "files", str(corpus["files"]), s3_endpoint, format="files", **prompt),
        "files-s3": _job(tmp_path, "files-s3", "s3://photos/shapes/", s3_endpoint, format="files", **prompt),
        "webdataset": _job(tmp_path, "webdataset", str(corpus["webdataset"]), s3_endpoint, format="webdataset", **prompt),
        "parquet-refs": _job(tmp_path, "parquet-refs", str(corpus["parquet-refs"] / "rows"), s3_endpoint,
                             image_column=REFERENCE_COLUMN, image_root=str(corpus["parquet-refs"] / "images")),
    }
    reference = runs["parquet"]["rows"]
    assert len(reference) == ROWS and all(r["answer"] and not r["error"] for r in reference.values())
    for name, run in runs.items():
        assert run["summary"]["output_rows"] == run["summary"]["ok_rows"] == ROWS, (name, run["summary"])
        assert set(run["count"]) == set(reference) and max(run["count"].values()) == 1, name
        for rid, row in run["rows"].items():
            assert (row["prompt"], row["answer"], row["kept_indices"]) == (
                reference[rid]["prompt"], reference[rid]["answer"], reference[rid]["kept_indices"]), (name, rid)
        manifest = read_manifest(locate(str(tmp_path / "out" / name)))
        assert manifest["input"]["format"] == name.split("-")[0]
    # What each format adds to the rows: the shards' text members, the reference; never the bytes.
    assert runs["webdataset"]["rows"][next(iter(reference))]["txt"] == CAPTION_PROMPT
    assert {r[REFERENCE_COLUMN] for r in runs["parquet-refs"]["rows"].values()} == {
        f.name for f in (corpus["parquet-refs"] / "images").iterdir()}
    assert "image" not in runs["files"]["rows"][next(iter(reference))]


def test_damaged_inputs_become_error_rows_and_every_id_is_written_once(
    tmp_path: Path, tiny_llava: str, s3_endpoint: str, local_ray: None
) -> None:
    # Image files: a zero-byte file and one that is not an image, beside good ones.
    files = write_corpus(tmp_path / "files", rows=4, seed=45, types=("caption",), fmt="files")
    (files / "empty.png").write_bytes(b"")
    (files / "garbage.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    run = _job(tmp_path, "files", str(files), s3_endpoint, format="files", prompt=CAPTION_PROMPT)
    assert run["summary"]["output_rows"] == 6 and run["summary"]["ok_rows"] == 4 and max(run["count"].values()) == 1
    assert run["rows"]["empty"]["error"] == "missing image: 0 bytes"
    assert run["rows"]["garbage"]["error"].startswith("corrupt image:")

    # Parquet rows naming their images: one names an object that is not there.
    refs = write_corpus(tmp_path / "refs", rows=4, seed=46, types=("caption",), fmt="parquet-refs")
    gone = sorted((refs / "images").iterdir())[1]
    gone.unlink()
    run = _job(tmp_path, "refs", str(refs / "rows"), s3_endpoint, image_column=REFERENCE_COLUMN,
               image_root=str(refs / "images"))
    assert run["summary"]["output_rows"] == 4 and run["summary"]["ok_rows"] == 3
    assert run["summary"]["errors_by_kind"] == {"missing image": 1}
    (bad,) = [r for r in run["rows"].values() if r["error"]]
    assert bad["error"] == f"missing image: not found: {gone}" and bad[REFERENCE_COLUMN] == gone.name

    # Tar shards: a key in two shards (the first kept), a shard cut short inside a member.
    shards = write_corpus(tmp_path / "wds", rows=6, seed=47, types=("caption",), fmt="webdataset", shards=2)
    first, second = sorted(shards.glob("*.tar"))
    repeated = tarfile.open(first).getmembers()[0]
    with tarfile.open(first) as src, tarfile.open(shards / "00002.tar", "w") as dst:
        dst.addfile(repeated, io.BytesIO(src.extractfile(repeated).read()))  # the first key again, in a later shard
    raw = second.read_bytes()
    second.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(Exception, match=r"1 id\(s\) repeated over 2 rows"):
        _job(tmp_path, "wds-fail", str(shards), s3_endpoint, format="webdataset", prompt=CAPTION_PROMPT)
    run = _job(tmp_path, "wds", str(shards), s3_endpoint, format="webdataset", prompt=CAPTION_PROMPT,
               id_policy="drop_duplicates")
    summary = run["summary"]
    listed = pq.read_table(tmp_path / "out" / "wds" / "_input" / "listing.parquet")
    assert summary["output_rows"] == summary["expected_rows"] == listed.num_rows - 1 and max(run["count"].values()) == 1
    assert summary["dropped"] == {"repeated id": 1}
    cut = [r for r in run["rows"].values() if r["error"]]
    assert len(cut) == 1 and cut[0]["error"].startswith("corrupt image: 00001.tar")
    assert summary["ok_rows"] == summary["output_rows"] - 1 and summary["ok_rows"] >= 3
    manifest = read_manifest(locate(str(tmp_path / "out" / "wds")))
    assert any("00001.tar: cut short" in p for p in manifest["input"]["problems"])
    assert any("00001.tar: cut short" in w for w in manifest["warnings"])
    assert pa.types.is_string(listed.schema.field("id").type)
