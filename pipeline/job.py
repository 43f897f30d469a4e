"""The driver: ``run_job`` is prepare -> claim -> execute -> report.

- prepare (``pipeline.plan``): everything decided before Ray starts, in one frozen plan;
- claim (here): Ray, the output claimed against other drivers, ``output.mode`` applied, resources;
- execute (``pipeline.dataset``): the Ray Data dataset, checkpointed on ``id``;
- report (``pipeline.report``): the summary and the manifest, from one object.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import ray

from pipeline.config import JobConfig
from pipeline.dataset import build_pipeline, committed_rows, execute, finalize
from pipeline.io.manifest import package_versions, write_manifest
from pipeline.io.runs import plan_incremental
from pipeline.io.storage import Location, locate
from pipeline.plan import JobPlan, check_resources, cost_model, prepare, run_identity
from pipeline.report import JobSummary, read_output_rows, summarize
from pipeline.tasks import task_spec
from pipeline.stages.engine_failures import close_ledger, open_ledger
from pipeline.stages.faults import ENV as FAULTS_ENV

log = logging.getLogger(__name__)
CLAIM_NAMESPACE = "resprune-pipeline"  # named actors are per namespace; every job's driver must see the same

# Re-exported: the job's public surface (tests, benchmarks and the evaluation grid use these).
__all__ = ["JobSummary", "OutputBusy", "RunFailed", "build_pipeline", "check_resources", "cost_model", "finalize",
           "run_identity", "run_job"]


class RunFailed(RuntimeError):
    """The run stopped part-way (storage, workers); what it committed stays, ``--resume`` goes on."""


class OutputBusy(RuntimeError):
    """Another driver on this Ray cluster is writing the same output: nothing was run."""


@dataclass(frozen=True)
class Claim:
    """What ``claim`` did: the output is this driver's while ``handles`` are held."""

    handles: tuple[Any, ...]
    already_done: int  # rows an earlier attempt committed


@dataclass
class Attempt:
    """This attempt of the run, as the manifest records it."""

    record: dict[str, Any]  # number, started_at, finished_at, status, rows_written, error
    earlier: list[dict[str, Any]]  # the records of the attempts before it
    base: dict[str, Any]  # the manifest's fields the plan decides (JobPlan.manifest_base)
    wall_seconds: float = 0.0
    engine_failures: dict[str, Any] | None = None


def run_job(cfg: JobConfig) -> JobSummary:
    """Run the whole pipeline on ``cfg``; returns the summary of what was written.

    Every run is checkpointed (Ray Data's ``CheckpointConfig`` keyed on ``id``, under
    ``<output>/_checkpoint``): a write task records its rows' ids as pending, writes its file,
    then commits the ids. ``output.mode: resume`` deletes the files of uncommitted writes, skips
    committed ids and writes the rest, so a run killed at any point and resumed holds every
    input row exactly once. ``output.incremental``: see ``pipeline.io.runs`` (raises
    ``NothingToRun`` when no shard is new)."""
    claims: list[Any] = []  # held until this function returns (see claim_output)
    incremental = None
    if cfg.output.incremental:
        init_ray(cfg)
        root = locate(cfg.output.path, cfg.storage)
        claims.append(claim_output(root))  # before planning: two schedulers never split the shards
        incremental = plan_incremental(cfg.input, [locate(p, cfg.storage) for p in cfg.input.paths], root)
    plan = prepare(cfg, incremental)
    held = claim(plan)
    claims.extend(held.handles)
    attempt = run_attempt(plan)
    return report(plan, held, attempt)


def claim(plan: JobPlan) -> Claim:
    """Start (or join) Ray, claim the output for this driver, apply ``output.mode: overwrite``,
    count what earlier attempts committed and check the pools fit the cluster."""
    init_ray(plan.cfg)
    handle = claim_output(plan.output)  # before anything is deleted or written
    if plan.cfg.output.mode == "overwrite":
        plan.output.delete_dir()
    already_done = committed_rows(plan.checkpoint)
    if plan.cfg.ray.check_resources:
        check_resources(plan.cfg, ray.cluster_resources(), checkpoint_filter=already_done > 0)
    return Claim((handle,), already_done)


def run_attempt(plan: JobPlan) -> Attempt:
    """One attempt: the `running` manifest, then the dataset; a failed attempt is recorded in the
    manifest and raised as ``RunFailed``."""
    earlier = list(plan.previous.get("attempts", [])) if plan.previous else []
    record = {"attempt": len(earlier) + 1, "started_at": _utc_now(), "finished_at": None, "status": "running",
              "rows_written": None, "error": None}
    attempt = Attempt(record, earlier, plan.manifest_base(record, package_versions()))
    write_manifest(plan.output, {**attempt.base, "status": "running", "attempts": [*earlier, record]})
    start = time.perf_counter()
    failures = open_ledger(plan.cfg.decode_stage.max_engine_restarts)
    try:
        execute(plan, failures)
    except Exception as e:  # noqa: BLE001 - recorded, then re-raised for the caller
        record |= {"finished_at": _utc_now(), "status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
        engine_failures = close_ledger(failures)  # each failure was logged once, by its actor
        try:
            write_manifest(plan.output, {**attempt.base, "status": "failed", "attempts": [*earlier, record],
                                         "engine_failures": engine_failures})
        except Exception:  # noqa: BLE001 - storage may be what failed; the `running` manifest stays
            log.warning("could not record the failed attempt in the manifest", exc_info=True)
        cause = engine_failures["exhausted"] or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise RunFailed(
            f"the run stopped: {cause}. Rows already committed "
            f"are kept in {plan.output.uri}: run the same command with --resume (output.mode: resume) to finish it"
        ) from e
    attempt.wall_seconds, attempt.engine_failures = time.perf_counter() - start, close_ledger(failures)
    return attempt


def report(plan: JobPlan, held: Claim, attempt: Attempt) -> JobSummary:
    """The summary, read back from the output, and the `completed` manifest built from it."""
    spec = task_spec(plan.cfg)
    rows = read_output_rows(plan.output, spec)
    run_cost = plan.costs.run_totals(rows, attempt.wall_seconds, plan.cfg.ray.io_num_cpus)
    summary = summarize(rows, plan.inputs, held.already_done, plan.output.uri, run_cost, spec)
    failures = attempt.engine_failures or {}
    summary.engine = plan.engine.as_dict()
    summary.engine_restarts, summary.retried_batches = failures["restarts"], failures["retried_batches"]
    record = attempt.record | {"finished_at": _utc_now(), "status": "completed",
                               "rows_written": summary.written_this_attempt}
    summary.manifest = write_manifest(plan.output, {
        **attempt.base,
        "status": "completed",
        "attempts": [*attempt.earlier, record],
        "finished_at": record["finished_at"],
        **summary.manifest_sections(),
        "cost": run_cost,
        "engine_failures": failures,
    })
    return summary


@ray.remote(num_cpus=0)
class _OutputClaim:
    """A named actor, named after an output, held by the driver writing it. Ray refuses a second
    actor of the same name, so a second driver on the cluster (a scheduled run that overlaps the
    last one, a manual --resume) cannot write the same output; the actor dies with its driver,
    so a killed run leaves no stale claim."""

    def ready(self) -> bool:
        return True


def claim_output(output: Location) -> Any:
    """Claim ``output`` on this Ray cluster for as long as the returned handle is held."""
    key = output.uri.rstrip("/") if output.is_remote else os.path.abspath(output.uri)
    try:
        handle = _OutputClaim.options(name=f"output:{key}", namespace=CLAIM_NAMESPACE).remote()
    except ValueError as e:  # "The name ... is already taken"
        raise OutputBusy(
            f"another driver on this Ray cluster is writing {output.uri}: wait for it to end (or stop it: "
            "`ray job list`, `ray job stop`), then run again with --resume"
        ) from e
    ray.get(handle.ready.remote(), timeout=120)
    return handle


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def init_ray(cfg: JobConfig) -> None:
    if ray.is_initialized():
        return
    # Fault drills (pipeline/stages/faults.py) reach the workers on any cluster.
    drill = {"runtime_env": {"env_vars": {FAULTS_ENV: os.environ[FAULTS_ENV]}}} if os.environ.get(FAULTS_ENV) else {}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **drill)
    elif os.environ.get("RAY_ADDRESS"):  # set by `ray job submit` and by users pointing at a cluster
        ray.init(**drill)
    else:  # a fresh local instance; never silently join some other local cluster
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, **drill)
