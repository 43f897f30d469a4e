"""Local rehearsal of the cluster deployment (infra/): a Ray head plus a worker node with logical
GPUs, started with `ray start` as KubeRay and the cluster launcher start them, and the RayCronJob's
entrypoint (`caption_corpus.py --config <cluster config> --input ... --output <root>
--incremental`) submitted with `ray job submit` through jobs/submit_local.sh. The config is
configs/llava-1.5-7b.yaml with the tiny model and CPU-sized pools: the same keys, GPU stages
included. Scheduled runs take only new shards; a second driver on the same output is refused.
Every step is a subprocess with a hard timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.io.storage import locate
from pipeline.io.manifest import read_manifest
from pipeline.tiny.shapes_world import SCHEMA, make_rows

from .conftest import REPO, free_port
from .test_job import JOB_TIMEOUT_S, _env

STEP_TIMEOUT_S = 120


def _rehearsal_config(tmp: Path) -> Path:
    """configs/llava-1.5-7b.yaml, same keys, with the tiny model and pools sized to this machine."""
    cfg = yaml.safe_load((REPO / "configs/llava-1.5-7b.yaml").read_text())
    shape = {k: sorted(v) if isinstance(v, dict) else v for k, v in cfg.items()}
    cfg["model"].update(path="tiny:llava-shapes", dtype="float32")  # logical GPUs: the models run on CPU
    cfg["generation"]["max_new_tokens"] = 4
    cfg["output"]["max_rows_per_file"] = 5
    cfg["text_stage"].update(num_cpus=0.25, max_pool_size=1, batch_size=16)
    cfg["prepare_stage"].update(num_cpus=0.25, pool_size=1, max_pool_size=1, batch_size=4)
    for stage in ("encode_stage", "decode_stage"):  # one replica per logical GPU, as on a GPU node
        cfg[stage].update(num_cpus=0.5, max_pool_size=2, batch_size=4)
    # Scheduling is what this rehearses; the vLLM engine (sized for the 7B model's 4096-token
    # context, not the tiny one's 2048) is exercised by tests/test_vllm_engine.py.
    cfg["decode_stage"]["engine"] = "hf"
    assert {k: sorted(v) if isinstance(v, dict) else v for k, v in cfg.items()} == shape  # no key added or lost
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _shard(root: Path, name: str, seed: int) -> set[str]:
    rows = make_rows(4, seed=seed)
    for r in rows:
        r["id"] = f"{name}-{r['id']}"
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / f"{name}.parquet")
    return {r["id"] for r in rows}


def _ray(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=env, capture_output=True, text=True,
                          timeout=STEP_TIMEOUT_S)
    assert proc.returncode == 0, f"ray {' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture()
def cluster(tmp_path: Path):
    """A head (1 CPU, no GPU) and a worker node (2 CPUs, 2 logical GPUs), token authentication on."""
    gcs, dashboard = free_port(), free_port()
    env = _env(RAY_AUTH_MODE="token", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    _ray(["get-auth-token", "--generate"], env) if not (Path.home() / ".ray/auth_token").exists() else None
    store = ["--object-store-memory", str(300 * 2**20), "--disable-usage-stats"]
    try:
        _ray(["start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port",
              str(dashboard), "--num-cpus", "1", "--num-gpus", "0", *store], env)
        _ray(["start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "2", "--num-gpus", "2", *store], env)
        yield {"env": env, "gcs": gcs, "dashboard": dashboard}
    finally:
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], env=env, capture_output=True,
                       timeout=STEP_TIMEOUT_S)


def _submit(cluster: dict, config: Path, data: Path, root: Path) -> tuple[int, str]:
    env = {**cluster["env"], "DASHBOARD_PORT": str(cluster["dashboard"]), "GCS_PORT": str(cluster["gcs"]),
           "DATA": str(data), "OUT": str(root), "JOB_TIMEOUT": str(JOB_TIMEOUT_S),
           "VENV": os.path.relpath(Path(sys.prefix), REPO)}
    proc = subprocess.run(["bash", "jobs/submit_local.sh", str(config), "--incremental"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S + 60)
    return proc.returncode, proc.stdout + proc.stderr


def _runs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith("run-")) if root.exists() else []


def _ids(run: Path) -> list[str]:
    return pads.dataset(run).to_table(columns=["id"]).column("id").to_pylist()


def test_scheduled_runs_on_a_head_plus_gpu_worker_cluster_take_only_new_shards(tmp_path: Path, cluster: dict) -> None:
    config, data, root = _rehearsal_config(tmp_path), tmp_path / "corpus", tmp_path / "annotations"
    first = _shard(data, "a", 1) | _shard(data, "b", 2)

    rc, log = _submit(cluster, config, data, root)
    assert rc == 0 and "succeeded" in log, log[-6000:]
    [run1] = _runs(root)
    assert sorted(_ids(run1)) == sorted(first)
    m1 = read_manifest(locate(str(run1)))
    assert m1["status"] == "completed" and m1["input"]["shards"] == ["a.parquet", "b.parquet"]
    assert m1["rows"]["ok"] == len(first) and m1["cost"]["accelerator"] == "h100-sxm"  # priced as GPU rows

    # The GPU pools ran on the worker node, the only one with GPUs, as on a real cluster.
    state_env = {**cluster["env"], "RAY_ADDRESS": f"http://127.0.0.1:{cluster['dashboard']}"}
    nodes = json.loads(_ray(["list", "nodes", "--format", "json", "--detail"], state_env))
    gpu_nodes = {n["node_id"] for n in nodes if n.get("resources_total", {}).get("GPU")}
    actors = json.loads(_ray(["list", "actors", "--format", "json", "--detail", "--limit", "1000"], state_env))
    on_gpu = [a for a in actors if (a.get("required_resources") or {}).get("GPU")]
    assert len(gpu_nodes) == 1 and len(on_gpu) >= 2, (nodes, actors)
    assert {a["node_id"] for a in on_gpu} == gpu_nodes

    # A shard lands; another driver is writing the root (a run that overran its schedule): refused.
    second = _shard(data, "c", 3)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, ray; from pipeline.job import claim_output; from pipeline.io.storage import locate; "
         "ray.init(address=sys.argv[1]); claim = claim_output(locate(sys.argv[2])); print('held', flush=True); sys.stdin.read()",
         f"127.0.0.1:{cluster['gcs']}", str(root)],
        cwd=REPO, env=cluster["env"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, log = _submit(cluster, config, data, root)
        assert rc != 0 and "output busy: another driver on this Ray cluster is writing" in log, log[-6000:]
        assert _runs(root) == [run1]
    finally:
        holder.communicate(timeout=STEP_TIMEOUT_S)  # closing stdin ends it; its claim dies with it

    deadline = time.monotonic() + 30  # the claim's actor is gone once its owner is
    rc, log = _submit(cluster, config, data, root)
    while rc != 0 and "output busy" in log and time.monotonic() < deadline:
        time.sleep(2)
        rc, log = _submit(cluster, config, data, root)
    assert rc == 0, log[-6000:]
    run1_, run2 = _runs(root)
    assert run1_ == run1 and sorted(_ids(run2)) == sorted(second)  # only the new shard
    m2 = read_manifest(locate(str(run2)))
    assert m2["input"]["shards"] == ["c.parquet"]
    assert m2["incremental"] == {"root": str(root), "resumed": False, "earlier_runs": 1, "shards_taken_before": 2}

    rc, log = _submit(cluster, config, data, root)  # nothing new: nothing runs, and that is a success
    assert rc == 0 and "nothing to run: no new input shards" in log, log[-6000:]
    assert len(_runs(root)) == 2
