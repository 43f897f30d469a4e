"""The job end to end under real Ray: local instance, S3 (moto on 127.0.0.1), `ray job submit`.

Each run is a subprocess with a hard timeout, so a scheduling deadlock fails the test instead
of hanging CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.io.storage import locate
from pipeline.io.manifest import read_manifest
from pipeline.io.schema import COST_COLUMNS, OUTPUT_SCHEMA
from pipeline.tiny.shapes_world import CAPTION_PROMPT, SCHEMA, make_rows

from .conftest import REPO, free_port

JOB_TIMEOUT_S = 300


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(extra)
    return env


def _run_cli(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run(
        [sys.executable, "jobs/caption_corpus.py", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc, json.loads(lines[-1][len("SUMMARY ") :])


def _bad_corpus() -> list[dict]:
    rows = make_rows(14, seed=11, corrupt=1)  # last row: undecodable bytes
    rows[3]["prompt"] = None
    rows[5]["prompt"] = "   "
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (2000, 1500), (1, 2, 3)).save(buf, format="PNG")
    rows[7]["image"] = buf.getvalue()
    return rows


def _write_shards(rows: list[dict], root: Path) -> None:
    root.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:7], schema=SCHEMA), root / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[7:], schema=SCHEMA), root / "b.parquet")


@pytest.fixture(scope="module")
def test_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    cfg["input"]["max_image_pixels"] = 1_000_000
    cfg["input"].pop("create_sample_rows")
    cfg["output"]["max_rows_per_file"] = 5
    path = tmp_path_factory.mktemp("cfg") / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_job_end_to_end_local_ray_with_bad_rows(tmp_path: Path, test_config: Path, tiny_llava: str) -> None:
    rows = _bad_corpus()
    _write_shards(rows, tmp_path / "in")
    _, summary = _run_cli(
        ["--config", str(test_config), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--keep", "64"],
        _env(),
    )
    assert summary["input_rows"] == summary["output_rows"] == 14
    assert summary["error_rows"] == 4 and summary["ok_rows"] == 10
    assert summary["errors_by_kind"] == {"missing prompt": 2, "image too large": 1, "corrupt image": 1}
    assert summary["missing_ids"] == summary["duplicate_ids"] == 0

    files = sorted((tmp_path / "out").glob("*.parquet"))
    assert len(files) >= 3  # max_rows_per_file = 5
    out = pads.dataset(tmp_path / "out").to_table()
    assert out.schema.names[: len(OUTPUT_SCHEMA)] == OUTPUT_SCHEMA.names
    assert out.schema.field("nouns").type == pa.list_(pa.string())
    assert "image" not in out.schema.names and "expected" in out.schema.names
    by_id = {r["id"]: r for r in out.to_pylist()}
    assert set(by_id) == {r["id"] for r in rows}
    bad = {rows[i]["id"] for i in (3, 5, 7, 13)}
    for rid, r in by_id.items():
        if rid in bad:
            assert r["error"] and r["answer"] == "" and r["visual_tokens_kept"] == 0
        else:
            assert r["error"] == "" and r["answer"]
            assert (r["method"], r["keep"], r["visual_tokens_in"], r["visual_tokens_kept"]) == ("resprune", 64, 576, 64)
            assert r["kept_indices"] == sorted(r["kept_indices"]) and len(set(r["kept_indices"])) == 64
            if r["prompt"] == CAPTION_PROMPT:  # no content nouns: ResPrune runs text-agnostic
                assert r["nouns"] == [] and r["extractor"] and r["relevance_mean"] is None
            else:
                assert r["nouns"] and r["extractor"] and r["relevance_min"] <= r["relevance_mean"] <= r["relevance_max"]
            assert r["prompt_tokens"] > 64 and r["generated_tokens"] >= 1
            assert min(r["prepare_ms"], r["encode_ms"], r["prune_ms"], r["decode_ms"]) > 0
    assert by_id[rows[13]["id"]]["error"].startswith("corrupt image")
    _check_costs(out.to_pylist(), summary, read_manifest(locate(str(tmp_path / "out"))), keep=64)


def _check_costs(rows: list[dict], summary: dict, manifest: dict, keep: int) -> None:
    """Cost columns on every answered row, nulls on error rows; summary and manifest carry totals."""
    ok = [r for r in rows if not r["error"]]
    for r in rows:
        if r["error"]:
            assert all(r[c] is None for c in COST_COLUMNS)
            continue
        assert r["flops_total"] == r["flops_vision"] + r["flops_prefill"] + r["flops_decode"]
        assert r["flops_prefill_unpruned"] > r["flops_prefill"] > 0 and r["flops_total_unpruned"] > r["flops_total"]
        assert r["kv_cache_bytes_unpruned"] > r["kv_cache_bytes"] > 0
        assert r["gpu_seconds"] == 0.0  # the local config reserves no GPU
        stage_s = (r["text_ms"] * 0.25 + r["prepare_ms"] * 0.25 + (r["encode_ms"] + r["prune_ms"]) * 0.5
                   + r["decode_ms"] * 0.5) / 1e3
        assert r["cpu_seconds"] == pytest.approx(stage_s, rel=1e-5)
        assert r["cost_usd"] == pytest.approx(r["cpu_seconds"] * manifest["cost"]["prices"]["cpu_core"]["usd_per_hour"] / 3600)
    cost = manifest["cost"]
    for c in COST_COLUMNS:
        total = sum(r[c] for r in ok)
        assert summary["cost_totals"][c] == pytest.approx(total) and cost["totals"][c] == pytest.approx(total)
        assert cost["mean_per_image"][c] == pytest.approx(total / len(ok))
    assert manifest["rows"] == {
        "input": summary["input_rows"], "expected": summary["input_rows"], "output": summary["output_rows"],
        "ok": len(ok), "error": summary["error_rows"], "errors_by_kind": summary["errors_by_kind"], "dropped": {},
        "skipped_already_done": 0, "written_this_attempt": summary["output_rows"], "missing_ids": 0,
        "duplicate_ids": 0, "truncated_prompts": 0,
    }
    assert manifest["status"] == "completed" and manifest["attempt"] == 1 and len(manifest["attempts"]) == 1
    # Where time went: the rows' stage times summed per stage, and the busiest per actor bounded the run.
    busy = manifest["stages"]["busy_seconds"]
    assert busy["prepare_stage"]["total"] == pytest.approx(sum(r["prepare_ms"] for r in ok) / 1e3, abs=2e-3)
    assert manifest["stages"]["bound_by"] == summary["bound_by"] == max(busy, key=lambda n: busy[n]["per_actor"])
    assert manifest["config"]["pruning"]["keep"] == keep and manifest["packages"]["torch"]
    assert manifest["started_at"] <= manifest["finished_at"] and cost["reserved"]["wall_seconds"] > 0
    from transformers import AutoConfig

    from pipeline.models.sources import resolve_model_path

    llm = AutoConfig.from_pretrained(resolve_model_path(manifest["config"]["model"]["path"])).text_config
    assert cost["prices"]["cpu_core"]["source"] and cost["shapes"]["language"]["layers"] == llm.num_hidden_layers


def test_job_reads_and_writes_s3(
    tmp_path: Path, test_config: Path, tiny_llava: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        # Distinctive fake credentials: a plain word such as "testing" also occurs in module names
        # that a crashing worker's faulthandler dump lists, which made this check flaky.
        key_id, secret = "AKIAFAKEKEY7Q2ZX", "fake-secret-5f1e9c0b7a"
        creds = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1"}
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=key_id, aws_secret_access_key=secret)
        s3.create_bucket(Bucket="corpus")
        rows = make_rows(6, seed=2)
        _write_shards(rows, tmp_path / "in")
        for f in (tmp_path / "in").iterdir():
            s3.upload_file(str(f), "corpus", f"in/{f.name}")
        # The weights from an S3 prefix too, copied to each node's cache (pipeline.models.sources).
        for f in Path(tiny_llava).iterdir():
            s3.upload_file(str(f), "corpus", f"models/tiny-llava/{f.name}")
        cfg = yaml.safe_load(test_config.read_text())
        cfg["model"]["path"] = "s3://corpus/models/tiny-llava/"
        (tmp_path / "s3.yaml").write_text(yaml.safe_dump(cfg))
        cache = tmp_path / "cache"
        proc, summary = _run_cli(
            ["--config", str(tmp_path / "s3.yaml"), "--input", "s3://corpus/in/", "--output", "s3://corpus/out/",
             "--method", "divprune"],
            _env(AWS_ENDPOINT_URL=endpoint, RESPRUNE_CACHE=str(cache), **creds),
        )
        assert summary["output_rows"] == summary["ok_rows"] == 6
        weights = sorted(f.name for f in Path(tiny_llava).iterdir())
        assert sorted(f.name for f in (cache / "s3/corpus/models/tiny-llava").iterdir()) == weights  # the actors' copy
        # The driver copied only the JSON files it reads; no half-written copy is left behind.
        assert sorted(f.name for f in (cache / "s3-metadata/corpus/models/tiny-llava").iterdir()) == [
            w for w in weights if w.endswith(".json")
        ]
        assert not [f for f in (cache / "s3/corpus/models").iterdir() if f.name.startswith(".")]
        listed = [o["Key"] for o in s3.list_objects_v2(Bucket="corpus", Prefix="out/")["Contents"]]
        # The rows; not pyarrow's dir markers, the manifest or the checkpoint's files.
        keys = [k for k in listed if not k.endswith("/") and not k.removeprefix("out/").startswith("_")]
        assert keys and all(k.endswith(".parquet") for k in keys)
        assert "out/_manifest.json" in listed
        local = tmp_path / "back"
        local.mkdir()
        for k in keys:
            s3.download_file("corpus", k, str(local / Path(k).name))
        out = pads.dataset(local).to_table()
        assert sorted(out.column("id").to_pylist()) == sorted(r["id"] for r in rows)
        assert set(out.column("method").to_pylist()) == {"divprune"}
        assert key_id not in proc.stdout + proc.stderr and secret not in proc.stdout + proc.stderr  # never printed
        for key, value in {"AWS_ENDPOINT_URL": endpoint, **creds}.items():
            monkeypatch.setenv(key, value)
        assert locate("s3://corpus/out/").has_files() and not locate("s3://corpus/elsewhere/").has_files()
        manifest = read_manifest(locate("s3://corpus/out/"))
        assert manifest["rows"]["ok"] == 6 and manifest["config"]["pruning"]["method"] == "divprune"
        assert manifest["model"]["configured_path"] == "s3://corpus/models/tiny-llava/"
        assert key_id not in json.dumps(manifest) and secret not in json.dumps(manifest)  # nor stored
    finally:
        server.stop()


def test_ray_job_submit_against_a_local_head(tmp_path: Path, tiny_llava: str) -> None:
    env = _env(
        DASHBOARD_PORT=str(free_port()), GCS_PORT=str(free_port()), JOB_TIMEOUT=str(JOB_TIMEOUT_S),
        DATA=str(tmp_path / "data"), OUT=str(tmp_path / "out"), VENV=os.path.relpath(Path(sys.prefix), REPO),
    )
    proc = subprocess.run(
        ["bash", "jobs/submit_local.sh", "configs/local.yaml"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S + 120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    summary = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY "))[len("SUMMARY ") :])
    assert summary["input_rows"] == summary["output_rows"] == summary["ok_rows"] == 48
    assert pads.dataset(tmp_path / "out").count_rows() == 48
