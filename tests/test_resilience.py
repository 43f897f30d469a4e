"""Nothing lost: hostile input, injected faults, a killed driver and resume, ids, all through the
real job (local Ray, subprocesses with hard timeouts). Every run is checked by id: each expected
id exactly once in the output, nothing else."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.io.images import decode_image
from pipeline.io.storage import locate
from pipeline.io.manifest import read_manifest
from pipeline.io.schema import ERROR_KINDS
from pipeline.tiny.shapes_world import SCHEMA, make_rows, write_corpus

from .conftest import REPO
from .test_job import JOB_TIMEOUT_S, _env


def _cli(args: list[str], env: dict[str, str] | None = None) -> tuple[int, dict | None, str]:
    proc = subprocess.run(
        [sys.executable, "jobs/caption_corpus.py", *args],
        cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY ")]
    summary = json.loads(lines[-1][len("SUMMARY ") :]) if lines else None
    return proc.returncode, summary, proc.stdout[-3000:] + proc.stderr[-6000:]


def _output_ids(out: Path) -> Counter:
    return Counter(pads.dataset(out).to_table(columns=["id"]).column("id").to_pylist())


def _config(tmp: Path, **sections: dict) -> Path:
    cfg = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    cfg["input"].pop("create_sample_rows")
    cfg["output"].update(max_rows_per_file=5, mode="error")
    cfg["generation"]["max_new_tokens"] = 4
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)
        else:  # a whole field (a task spec's path)
            cfg[name] = values
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _hostile_corpus(root: Path) -> tuple[set[str], dict[str, str], str]:
    """Shards with a binary prompt column and every kind of bad row; returns the ids the output
    must hold, the error kind expected per id (absent: answered) and the repeated id."""
    rows = make_rows(24, seed=5)
    for r in rows:
        r["prompt"] = r["prompt"].encode()
    png = rows[1]["image"]
    cases = {  # row index -> (image, prompt, expected error kind or "")
        0: (b"\x00\x01 not an image at all", None, "corrupt image"),
        1: (png[: len(png) // 2], None, "corrupt image"),  # truncated
        2: (b"", None, "missing image"),
        3: (_encoded(Image.new("RGB", (1200, 1000), (9, 9, 9)), "PNG"), None, "image too large"),
        4: (_encoded(Image.new("RGB", (1, 1), (200, 0, 0)), "PNG"), None, "image too small"),
        5: (_encoded(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG"), None, ""),
        6: (_encoded(Image.fromarray(np.full((40, 60), 40000, dtype=np.uint16)), "PNG"), None, ""),  # I;16
        7: (_encoded(Image.new("LA", (50, 50), (120, 0)), "PNG"), None, ""),
        8: (_palette_with_transparency(), None, ""),
        9: (None, None, "missing prompt"),
        10: (None, b"", "missing prompt"),
        11: (None, b"   \n ", "missing prompt"),
        12: (None, b"What colour \xff\xfe is it?", "invalid prompt"),
        13: (None, ("Describe the shapes in detail. " * 3700).encode(), "prompt too long"),  # ~110k characters
        14: (None, None, "encode failed"),  # poisoned id (RESPRUNE_FAULTS)
    }
    expected_errors = {}
    for i, (image, prompt, kind) in cases.items():
        if image is not None:
            rows[i]["image"] = image
        if prompt is not None or i == 9:
            rows[i]["prompt"] = prompt
        if kind:
            expected_errors[rows[i]["id"]] = kind
    want = {r["id"] for r in rows}
    # Id problems, dropped under input.id_policy: drop_duplicates (the first row of an id stays).
    repeat = dict(rows[20], prompt=b"a later copy, dropped")
    extra = [repeat, dict(rows[21], id=None), dict(rows[22], id="")]
    schema = pa.schema([SCHEMA.field(n) if n != "prompt" else pa.field("prompt", pa.binary()) for n in SCHEMA.names])
    root.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:12], schema=schema), root / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[12:] + extra, schema=schema), root / "b.parquet")
    return want, expected_errors, repeat["id"]


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (40, 40), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.info["transparency"] = 0
    return _encoded(img, "PNG")


def test_hostile_input_and_injected_faults_lose_nothing(tmp_path: Path, tiny_llava: str) -> None:
    want, expected_errors, repeated = _hostile_corpus(tmp_path / "in")
    poisoned = next(i for i, k in expected_errors.items() if k == "encode failed")
    marker = tmp_path / "decode-crashed"
    faults = [{"stage": "encode", "fail_ids": [poisoned]}, {"stage": "decode", "crash_once": str(marker)}]
    cfg = _config(tmp_path, input={"id_policy": "drop_duplicates", "max_image_pixels": 1_000_000})
    rc, summary, log = _cli(
        ["--config", str(cfg), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")],
        _env(RESPRUNE_FAULTS=json.dumps(faults)),
    )
    assert rc == 0 and summary, log
    assert marker.exists()  # a decode actor really died on its first batch, and its rows came back
    ids = _output_ids(tmp_path / "out")
    assert set(ids) == want and max(ids.values()) == 1
    rows = {r["id"]: r for r in pads.dataset(tmp_path / "out").to_table().to_pylist()}
    for rid, r in rows.items():
        kind = r["error"].split(":")[0]
        assert kind == expected_errors.get(rid, ""), (rid, r["error"])
        assert bool(r["answer"]) == (not kind)
    assert rows[poisoned]["error"].startswith("encode failed: InjectedFault")
    # Image errors come from the CPU preparation stage, worded exactly as pipeline.io.images words them.
    inputs = {r["id"]: r for r in pads.dataset(tmp_path / "in").to_table().to_pylist() if r["id"] in rows}
    for rid, r in rows.items():
        said = decode_image(inputs[rid]["image"], 1_000_000, 8)
        if isinstance(said, str) and not expected_errors.get(rid, "").endswith("prompt"):
            assert re.sub("0x[0-9a-f]+", "0x", r["error"]) == re.sub("0x[0-9a-f]+", "0x", said), rid  # PIL names a buffer
        assert (r["prepare_ms"] > 0) == (not r["error"] or r["error"].startswith(("encode failed", "prompt too long")))
    assert "prompt too long: " in next(r["error"] for r in rows.values() if r["error"].startswith("prompt too long"))
    assert summary["input_rows"] == 27 and summary["expected_rows"] == 24 == summary["output_rows"]
    assert summary["dropped"] == {"missing id": 2, "repeated id": 1}
    assert summary["errors_by_kind"] == dict(Counter(expected_errors.values()))
    assert set(summary["errors_by_kind"]) <= set(ERROR_KINDS)  # every kind documented
    manifest = read_manifest(locate(str(tmp_path / "out")))
    assert manifest["status"] == "completed" and manifest["rows"]["dropped"] == summary["dropped"]
    assert manifest["rows"]["missing_ids"] == manifest["rows"]["duplicate_ids"] == 0
    assert rows[repeated]["prompt"] != "a later copy, dropped"  # the first row of a repeated id stays


def test_a_row_that_kills_its_actor_every_time_stops_the_run_instead_of_looping(
    tmp_path: Path, tiny_llava: str
) -> None:
    write_corpus(str(tmp_path / "in"), rows=12, shards=3, seed=12)
    ids = sorted(pads.dataset(tmp_path / "in").to_table(columns=["id"]).column("id").to_pylist())
    cfg = _config(tmp_path, ray={"max_task_retries": 1}, text_stage={"batch_size": 4},
                  encode_stage={"batch_size": 4}, decode_stage={"batch_size": 4})
    start = time.perf_counter()
    rc, summary, log = _cli(
        ["--config", str(cfg), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")],
        _env(RESPRUNE_FAULTS=json.dumps([{"stage": "decode", "crash_ids": [ids[5]]}])),
    )
    assert rc == 3 and summary is None and "run failed: " in log and "--resume" in log, log
    assert time.perf_counter() - start < JOB_TIMEOUT_S
    manifest = read_manifest(locate(str(tmp_path / "out")))
    assert manifest["status"] == "failed" and manifest["attempts"][0]["error"]
    written = _output_ids(tmp_path / "out") if any((tmp_path / "out").glob("*.parquet")) else Counter()
    assert ids[5] not in written and max(written.values(), default=1) == 1


def test_repeated_ids_fail_before_any_model_work(tmp_path: Path) -> None:
    rows = make_rows(4, seed=1)
    rows[3]["id"] = rows[0]["id"]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp_path / "in" / "a.parquet")
    start = time.perf_counter()
    rc, _, log = _cli(["--config", str(_config(tmp_path)), "--input", str(tmp_path / "in"),
                       "--output", str(tmp_path / "out")])
    assert rc == 2 and "input error" in log and "1 id(s) repeated over 2 rows" in log and repr(rows[0]["id"]) in log
    assert "drop_duplicates" in log and not (tmp_path / "out").exists()
    assert time.perf_counter() - start < 60  # no Ray, no model


def _wait_until_quiet(folder: Path, quiet_s: float, limit_s: float) -> None:
    """Until nothing under ``folder`` has changed for ``quiet_s`` seconds (at most ``limit_s``)."""
    def state() -> list[tuple[str, int]]:
        return sorted((p.name, p.stat().st_size) for p in folder.glob("*") if p.exists())

    deadline, last, since = time.monotonic() + limit_s, state(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = state()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
    raise AssertionError(f"{folder} kept changing for {limit_s} s after the driver was killed")


def kill_mid_run(args: list[str], out: Path, run: str = ".", earlier: frozenset[str] = frozenset()) -> None:
    """Start the job, SIGKILL its driver (then the local Ray it started, as a lost machine would)
    once a write has committed, and wait until the killed attempt's writes are quiet. A second
    per decode batch: once vLLM has started, it would otherwise answer every row (the encode stage
    runs ahead while the engine starts) before the kill could land mid-run. ``run``: the run's
    folder under ``out`` as a glob (an incremental run's ``run-*``), ``earlier`` the folders it skips."""
    slow = _env(RESPRUNE_FAULTS=json.dumps([{"stage": "decode", "delay_s": 1.0}]))
    proc = subprocess.Popen([sys.executable, "jobs/caption_corpus.py", *args], cwd=REPO, env=slow,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = out / "_checkpoint"
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            committed = [p for p in out.glob(f"{run}/_checkpoint/*.parquet")
                         if not p.name.endswith(".pending.parquet") and p.parent.parent.name not in earlier]
            if committed:
                checkpoint = committed[0].parent
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # the driver, mid-run
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # A write task already running may still commit for a moment (seen: 1.6 s after the kill);
    # a resume starts once the old attempt is quiet, as it would after a real crash.
    _wait_until_quiet(checkpoint, quiet_s=5, limit_s=60)


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_killed_driver_then_resume_writes_every_row_exactly_once(tmp_path: Path, tiny_llava: str, engine: str) -> None:
    """On HF with the demo's three annotation tasks (one row per image, list columns in flight), on
    vLLM one row per prompt: the checkpoint is the same either way, one kill per engine is enough."""
    # Ten shards and small batches: blocks of a few rows flow through, so writes commit one by one.
    write_corpus(str(tmp_path / "in"), rows=40, shards=10, seed=8)
    want = set(pads.dataset(tmp_path / "in").to_table(columns=["id"]).column("id").to_pylist())
    tasks = {"tasks": str(REPO / "configs/tasks/shapes.yaml")} if engine == "hf" else {}
    cfg = _config(tmp_path, text_stage={"batch_size": 4}, encode_stage={"batch_size": 4},
                  decode_stage={"batch_size": 4, "engine": engine}, **tasks)
    args = ["--config", str(cfg), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    kill_mid_run(args, tmp_path / "out")
    before = _output_ids(tmp_path / "out")
    assert 0 < sum(before.values()) < len(want)
    assert read_manifest(locate(str(tmp_path / "out")))["status"] == "running"

    if engine == "hf":  # checks made before any engine starts: once is enough
        rc, _, log = _cli(args)  # the same command without --resume refuses to mix runs
        assert rc == 2 and "--resume" in log
        rc, _, log = _cli([*args, "--resume", "--keep", "64"])  # a resume must not change what a row gets
        assert rc == 2 and "pruning.keep: 128 then, 64 now" in log

    rc, summary, log = _cli([*args, "--resume"])
    assert rc == 0 and summary and summary["engine"]["name"] == engine, log
    ids = _output_ids(tmp_path / "out")
    assert set(ids) == want and max(ids.values()) == 1  # every row exactly once
    assert summary["skipped_already_done"] >= sum(before.values()) - 8  # an uncommitted file may be dropped
    assert summary["written_this_attempt"] == len(want) - summary["skipped_already_done"]
    manifest = read_manifest(locate(str(tmp_path / "out")))
    assert manifest["attempt"] == 2 and [a["status"] for a in manifest["attempts"]] == ["running", "completed"]
    assert manifest["rows"]["output"] == len(want) and manifest["rows"]["skipped_already_done"] > 0

    if engine == "hf":  # a finished run resumed: nothing to do, nothing repeated (the same for any engine)
        assert [t["name"] for t in manifest["run_identity"]["tasks"]] == ["caption", "colour", "objects"]
        assert set(manifest["tasks"]["by_task"]) == {"caption", "colour", "objects"}
        answered = pads.dataset(tmp_path / "out").to_table(columns=["caption", "caption_error"]).to_pylist()
        assert all(r["caption"] and not r["caption_error"] for r in answered)  # both attempts answered the tasks
        rc, summary, log = _cli([*args, "--resume"])
        assert rc == 0 and summary["written_this_attempt"] == 0 and summary["output_rows"] == len(want), log


@pytest.fixture
def s3(tmp_path: Path):
    """A real S3 endpoint (moto's server) on 127.0.0.1 that a test can stop and restart on the
    same port; its objects survive a restart (moto keeps them in this process)."""
    import boto3
    from moto.server import ThreadedMotoServer

    from .conftest import free_port

    port = free_port()
    state = {"server": ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)}
    state["server"].start()
    creds = {"AWS_ACCESS_KEY_ID": "AKIAFAKEKEY7Q2ZX", "AWS_SECRET_ACCESS_KEY": "fake-secret-5f1e9c0b7a",
             "AWS_REGION": "us-east-1"}
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"])

    def stop() -> None:
        state["server"].stop()

    def start() -> None:
        state["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        state["server"].start()

    yield {"client": client, "env": _env(AWS_ENDPOINT_URL=endpoint, **creds), "stop": stop, "start": start}
    state["server"].stop()


def _s3_ids(client, bucket: str, prefix: str, tmp: Path) -> Counter:
    local = tmp / f"back-{time.monotonic_ns()}"
    local.mkdir()
    for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        key = o["Key"]
        if key.endswith(".parquet") and not key[len(prefix) :].startswith("_"):
            client.download_file(bucket, key, str(local / Path(key).name))
    return _output_ids(local) if any(local.iterdir()) else Counter()


def _committed_on_s3(client, bucket: str, prefix: str) -> int:
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}_checkpoint/").get("Contents", [])]
    return sum(1 for k in keys if k.endswith(".parquet") and not k.endswith(".pending.parquet"))


def _wait_for(predicate, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before {what}"
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _run_interrupted(args: list[str], env: dict[str, str], ready, fault) -> tuple[int, str]:
    """The job in a subprocess; once ``ready()`` holds mid-run, ``fault()``; its status and log."""
    proc = subprocess.Popen([sys.executable, "jobs/caption_corpus.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(ready, proc, "a first committed write")
        fault()
        log, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        proc.kill()
    return proc.returncode, log


def test_s3_outage_is_retried_and_a_lost_bucket_fails_cleanly_then_resumes(
    s3: dict, tmp_path: Path, tiny_llava: str
) -> None:
    client, env = s3["client"], s3["env"]
    # moto keeps every bucket for the life of the test process: names of this test's own.
    corpus, out1, out2 = (f"resilience-{name}-{uuid.uuid4().hex[:8]}" for name in ("corpus", "out1", "out2"))
    client.create_bucket(Bucket=corpus)
    write_corpus(str(tmp_path / "in"), rows=40, shards=10, seed=9)
    for f in (tmp_path / "in").iterdir():
        client.upload_file(str(f), corpus, f"in/{f.name}")
    want = set(pads.dataset(tmp_path / "in").to_table(columns=["id"]).column("id").to_pylist())
    cfg = _config(tmp_path, text_stage={"batch_size": 4}, encode_stage={"batch_size": 4},
                  decode_stage={"batch_size": 4})

    # 1. The endpoint goes away for 6 s mid-run and comes back: retried, the run completes.
    client.create_bucket(Bucket=out1)
    args = ["--config", str(cfg), "--input", f"s3://{corpus}/in/", "--output", f"s3://{out1}/run/"]
    seen = {}

    def outage() -> None:
        seen["before"] = _committed_on_s3(client, out1, "run/")
        s3["stop"]()
        time.sleep(6)
        s3["start"]()

    rc, log = _run_interrupted(args, env, lambda: _committed_on_s3(client, out1, "run/") >= 1, outage)
    assert rc == 0, log[-6000:]
    assert "AKIAFAKEKEY7Q2ZX" not in log and "fake-secret-5f1e9c0b7a" not in log
    ids = _s3_ids(client, out1, "run/", tmp_path)
    assert set(ids) == want and max(ids.values()) == 1
    assert _committed_on_s3(client, out1, "run/") > seen["before"]  # writes went on across the outage

    # 2. The output bucket is deleted mid-run (a permanent error): the run stops with exit 3 and a
    # message; with the bucket back, --resume completes it, every row exactly once.
    client.create_bucket(Bucket=out2)
    args = ["--config", str(cfg), "--input", f"s3://{corpus}/in/", "--output", f"s3://{out2}/run/"]

    def lose_bucket() -> None:
        # The job keeps writing while the bucket is emptied, so a key can land between the listing
        # and the delete (S3 then answers BucketNotEmpty): empty and delete again, a bounded number of times.
        for _ in range(50):
            for o in client.list_objects_v2(Bucket=out2).get("Contents", []):
                client.delete_object(Bucket=out2, Key=o["Key"])
            try:
                client.delete_bucket(Bucket=out2)
                return
            except client.exceptions.ClientError as e:
                if e.response["Error"]["Code"] != "BucketNotEmpty":
                    raise
        raise AssertionError("the output bucket could not be emptied and deleted in 50 tries")

    rc, log = _run_interrupted(args, env, lambda: _committed_on_s3(client, out2, "run/") >= 1, lose_bucket)
    assert rc == 3 and "run failed: " in log and "--resume" in log, log[-6000:]
    client.create_bucket(Bucket=out2)
    rc, summary, log = _cli([*args, "--resume"], env)
    assert rc == 0 and summary, log
    ids = _s3_ids(client, out2, "run/", tmp_path)
    assert set(ids) == want and max(ids.values()) == 1


def test_losing_a_gpu_worker_node_mid_run_loses_no_row(tmp_path: Path, tiny_llava: str) -> None:
    """A head and a worker node that declares one (logical) GPU, so the GPU stages schedule as on
    a real cluster; once the first rows are committed, a second GPU node joins and the first is
    killed with every GPU actor on it. The run completes, every row exactly once."""
    from ray.cluster_utils import Cluster

    write_corpus(str(tmp_path / "in"), rows=32, shards=8, seed=10)
    want = set(pads.dataset(tmp_path / "in").to_table(columns=["id"]).column("id").to_pylist())
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    try:
        first = cluster.add_node(num_cpus=2, num_gpus=1)
        gpu = {"num_cpus": 0.5, "num_gpus": 0.5, "batch_size": 4}
        cfg = _config(
            tmp_path, model={"device": "cpu"}, cost={"accelerator": "h100-sxm"}, ray={"address": cluster.address},
            text_stage={"batch_size": 4}, encode_stage=gpu, decode_stage=gpu,
        )
        args = ["--config", str(cfg), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
        checkpoint = tmp_path / "out" / "_checkpoint"

        def swap_nodes() -> None:
            cluster.add_node(num_cpus=2, num_gpus=1)
            cluster.remove_node(first, allow_graceful=False)  # the node and its GPU actors die

        rc, log = _run_interrupted(
            args, _env(), lambda: any(not p.name.endswith(".pending.parquet") for p in checkpoint.glob("*.parquet")),
            swap_nodes,
        )
        assert rc == 0, log[-6000:]
    finally:
        cluster.shutdown()
    ids = _output_ids(tmp_path / "out")
    assert set(ids) == want and max(ids.values()) == 1
    summary = json.loads(next(ln for ln in log.splitlines() if ln.startswith("SUMMARY "))[len("SUMMARY ") :])
    assert summary["ok_rows"] == 32 and summary["accelerator"] == "h100-sxm" and summary["cost_totals"]["gpu_seconds"] > 0
