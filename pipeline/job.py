"""Orchestration: Parquet in -> text (CPU pool) -> encode+prune (GPU pool) -> decode (GPU pool)
-> Parquet out, then a summary read back from the output. Processing lives in ``stages``."""

from __future__ import annotations

import heapq
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray
import ray.data
import torch
from ray.data import ActorPoolStrategy, SaveMode
from ray.data.checkpoint import CheckpointConfig

from pipeline.config import ConfigError, JobConfig, StageConfig, StorageConfig
from pipeline.cost.accounting import CostModel
from pipeline.engines import EngineEnvironment, engine_environment
from pipeline.io.inputs import InputPlan, check_input, drop_rows, stage_first_rows
from pipeline.io.manifest import MANIFEST_NAME, package_versions, read_manifest, write_manifest
from pipeline.io.runs import plan_incremental
from pipeline.io.sample_corpus import write_corpus
from pipeline.io.schema import COST_COLUMNS, STAGE_TIME_COLUMNS, to_output_table
from pipeline.io.storage import (
    delete_dir,
    filesystem_for,
    fs_path,
    has_files,
    is_uri,
    join,
    local_or,
    parquet_dataset,
    ray_path,
    retrying,
)
from pipeline.models import ADAPTERS, detect_family, model_shapes
from pipeline.models.base import planned_dtype
from pipeline.models.sources import resolve_model_path
from pipeline.pruning import per_image_stats
from pipeline.quality.scoring import is_caption, label_scores
from pipeline.stages.decode import DecodeStage
from pipeline.stages.encode import EncodeStage
from pipeline.stages.engine_failures import close_ledger, open_ledger
from pipeline.stages.faults import ENV as FAULTS_ENV
from pipeline.stages.text import TextStage

log = logging.getLogger(__name__)
EXAMPLES = 5  # rows the summary shows
CAPTION_EXAMPLES = 3  # and caption rows beyond them
CHECKPOINT_DIR = "_checkpoint"  # under the output: Ray Data's record of committed ids
# Ray Data's checkpoint filter runs as an actor pool of its own; its actors reserve 1 CPU each
# (Ray's default for map actors; CheckpointConfig offers no knob) and 1 GiB of memory.
CHECKPOINT_FILTER_CPUS = 1.0
CLAIM_NAMESPACE = "resprune-pipeline"  # named actors are per namespace; every job's driver must see the same


@dataclass
class JobSummary:
    input_rows: int  # rows in the input files
    expected_rows: int  # rows the output must hold: input rows less those input.id_policy dropped
    output_rows: int  # rows in the output, every attempt of the run included
    ok_rows: int
    error_rows: int
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # input rows dropped by id, by reason
    skipped_already_done: int = 0  # rows an earlier attempt had committed (resume)
    written_this_attempt: int = 0
    missing_ids: int = 0  # expected ids absent from the output (0 for a complete run)
    duplicate_ids: int = 0  # output rows beyond the first of their id (always 0, checked)
    truncated_prompts: int = 0
    extractors: dict[str, int] = field(default_factory=dict)
    mean_visual_tokens_in: float = 0.0
    mean_visual_tokens_kept: float = 0.0
    # Per answered image (pipeline.pruning.per_image_stats): mean, p50, p90, min, max. With an
    # adaptive budget (pruning.energy) this is what the corpus actually kept.
    visual_tokens_kept: dict[str, float | None] = field(default_factory=dict)
    energy_explained: dict[str, float | None] = field(default_factory=dict)  # the same, of energy_explained (ResPrune)
    mean_stage_ms: dict[str, float] = field(default_factory=dict)
    output: str = ""
    wall_seconds: float = 0.0  # read -> stages -> write, actor start-up included
    accelerator: str | None = None
    cost_totals: dict[str, float] = field(default_factory=dict)  # every cost column, summed over answered rows
    cost_mean_per_image: dict[str, float | None] = field(default_factory=dict)
    reserved_usd: float = 0.0  # what the run's reservation cost over wall_seconds
    utilisation: float | None = None  # share of reserved_usd the rows account for
    accuracy: float | None = None  # when the input has `expected`: normalised exact match over the short-answer rows
    caption_f1: float | None = None  # when it also has `question_type`: object F1 over the caption rows
    examples: list[dict[str, str]] = field(default_factory=list)  # a few rows, for a person to check
    manifest: str = ""
    engine: dict[str, str] = field(default_factory=dict)  # decode engine: name, package, version, interpreter
    engine_restarts: int = 0  # decode engines that died or got stuck and were replaced (pipeline.engines.watchdog)
    retried_batches: int = 0  # distinct decode batches that ran again on a fresh engine

    def as_dict(self) -> dict:
        return asdict(self)


class RunFailed(RuntimeError):
    """The run stopped part-way (storage, workers); what it committed stays, ``--resume`` goes on."""


class OutputBusy(RuntimeError):
    """Another driver on this Ray cluster is writing the same output: nothing was run."""


def run_job(cfg: JobConfig) -> JobSummary:
    """Run the whole pipeline on ``cfg``; returns the summary of what was written.

    Every run is checkpointed (Ray Data's ``CheckpointConfig`` keyed on ``id``, under
    ``<output>/_checkpoint``): a write task records its rows' ids as pending, writes its file,
    then commits the ids. ``output.mode: resume`` deletes the files of uncommitted writes, skips
    committed ids and writes the rest, so a run killed at any point and resumed holds every
    input row exactly once. ``output.incremental``: see ``pipeline.io.runs`` (raises
    ``NothingToRun`` when no shard is new)."""
    claims = []  # held until this function returns: see _claim_output
    run = None
    if cfg.output.incremental:
        _init_ray(cfg)
        root = cfg.output.path
        claims.append(_claim_output(root))  # before planning: two schedulers never split the shards
        run = plan_incremental(cfg.input.path, root, cfg.storage)
        output = cfg.output.model_copy(update={"path": run.output, "mode": "resume", "incremental": False})
        cfg = cfg.model_copy(update={"output": output})
    storage, out = cfg.storage, cfg.output.path
    identity = run_identity(cfg)
    previous = _check_output(cfg, identity)
    _prepare_local_input(cfg)
    plan = check_input(cfg.input.path, cfg.input.id_policy, storage, run.shards if run else None)
    cfg, model_path = _resolve_model(cfg)
    costs = cost_model(cfg)  # reads the price table: a bad accelerator or price file fails before Ray starts
    engine = engine_environment(cfg.decode_stage)  # a missing vLLM environment fails here, naming the field
    _init_ray(cfg)
    claims.append(_claim_output(out))  # before anything is deleted or written
    if cfg.output.mode == "overwrite":
        delete_dir(out, storage)
    checkpoint = join(out, CHECKPOINT_DIR)
    already_done = committed_rows(checkpoint, storage)
    if cfg.ray.check_resources:
        check_resources(cfg, ray.cluster_resources(), checkpoint_filter=already_done > 0)
    attempts = list(previous.get("attempts", [])) if previous else []
    attempt = {"attempt": len(attempts) + 1, "started_at": _utc_now(), "finished_at": None, "status": "running",
               "rows_written": None, "error": None}
    base = {
        "attempt": attempt["attempt"],
        "started_at": attempt["started_at"],
        "run_identity": identity,
        "config": cfg.model_dump(mode="json"),
        "packages": package_versions(),
        "input": {"files": len(plan.files), "rows": plan.rows, "dropped": plan.dropped,
                  **({"shards": run.shards} if run else {})},
        **({"incremental": {"root": root, "resumed": run.resumed, "earlier_runs": run.earlier_runs,
                            "shards_taken_before": run.shards_taken_before}} if run else {}),
        "model": {"configured_path": cfg.model.path, "path": model_path, "family": cfg.model.family,
                  "kv_bytes_per_element": costs.kv_bytes_per_element},
        "engine": engine.as_dict(),
    }
    write_manifest(out, {**base, "status": "running", "attempts": [*attempts, attempt]}, storage)
    start = time.perf_counter()
    failures = open_ledger(cfg.decode_stage.max_engine_restarts)
    try:
        _execute(cfg, costs, plan, checkpoint, engine, failures)
    except Exception as e:  # noqa: BLE001 - recorded, then re-raised for the caller
        attempt |= {"finished_at": _utc_now(), "status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
        engine_failures = close_ledger(failures)  # each failure was logged once, by its actor
        try:
            write_manifest(out, {**base, "status": "failed", "attempts": [*attempts, attempt],
                                 "engine_failures": engine_failures}, storage)
        except Exception:  # noqa: BLE001 - storage may be what failed; the `running` manifest stays
            log.warning("could not record the failed attempt in the manifest", exc_info=True)
        cause = engine_failures["exhausted"] or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise RunFailed(
            f"the run stopped: {cause}. Rows already committed "
            f"are kept in {out}: run the same command with --resume (output.mode: resume) to finish it"
        ) from e
    wall = time.perf_counter() - start
    engine_failures = close_ledger(failures)
    rows = read_output_rows(out, storage)
    run_cost = costs.run_totals(rows, wall, cfg.ray.io_num_cpus)
    summary = summarize(rows, plan, already_done, out, run_cost)
    summary.engine = engine.as_dict()
    summary.engine_restarts, summary.retried_batches = engine_failures["restarts"], engine_failures["retried_batches"]
    attempt |= {"finished_at": _utc_now(), "status": "completed", "rows_written": summary.written_this_attempt}
    summary.manifest = write_manifest(
        out,
        {
            **base,
            "status": "completed",
            "attempts": [*attempts, attempt],
            "finished_at": attempt["finished_at"],
            "rows": {
                "input": summary.input_rows, "expected": summary.expected_rows, "output": summary.output_rows,
                "ok": summary.ok_rows, "error": summary.error_rows, "errors_by_kind": summary.errors_by_kind,
                "dropped": summary.dropped, "skipped_already_done": summary.skipped_already_done,
                "written_this_attempt": summary.written_this_attempt, "missing_ids": summary.missing_ids,
                "duplicate_ids": summary.duplicate_ids, "truncated_prompts": summary.truncated_prompts,
            },
            "visual_tokens": {"mean_in": summary.mean_visual_tokens_in, "mean_kept": summary.mean_visual_tokens_kept,
                              "kept": summary.visual_tokens_kept, "energy_explained": summary.energy_explained},
            "cost": run_cost,
            "engine_failures": engine_failures,
        },
        storage,
    )
    return summary


def _execute(
    cfg: JobConfig, costs: CostModel, plan: InputPlan, checkpoint: str, engine: EngineEnvironment, failures: Any
) -> None:
    """Read -> stages -> write, checkpointed on ``id``."""
    context = ray.data.DataContext.get_current()
    # Ray 2.60's DataSource V2 read adds a ListFiles task that always reserves 1 CPU, ignoring
    # num_cpus: with the pools sized to a 2-CPU machine that task never schedules and the job
    # hangs. The classic reader honours num_cpus.
    context.use_datasource_v2 = False
    # Kept after success: a resume of a finished run then finds every id done and writes nothing.
    context.checkpoint_config = CheckpointConfig(
        id_column="id", checkpoint_path=ray_path(checkpoint), delete_checkpoint_on_success=False,
        override_filesystem=filesystem_for(checkpoint, cfg.storage),
    )
    try:
        _read_process_write(cfg, costs, plan, engine, failures)
    finally:  # the process may run more datasets (the evaluation grid): none inherits this run's checkpoint
        context.checkpoint_config = None


def _read_process_write(
    cfg: JobConfig, costs: CostModel, plan: InputPlan, engine: EngineEnvironment, failures: Any
) -> None:
    storage, io_cpus = cfg.storage, cfg.ray.io_num_cpus
    in_fs = filesystem_for(cfg.input.path, storage)
    ds = ray.data.read_parquet([_ray_file(cfg.input.path, f) for f in plan.files], filesystem=in_fs, num_cpus=io_cpus)
    if plan.dropped:
        ds = ds.map_batches(
            drop_rows, fn_kwargs={"excluded": frozenset(plan.excluded_ids)},
            batch_format="pyarrow", batch_size=None, num_cpus=io_cpus,
        )
    staged = stage_first_rows(plan, cfg.output.path, storage)
    if staged:  # a second read, so the checkpoint filter covers both branches
        out_fs = filesystem_for(cfg.output.path, storage)
        ds = ds.union(ray.data.read_parquet(ray_path(staged), filesystem=out_fs, num_cpus=io_cpus))
    ds = build_pipeline(ds, cfg, costs, engine, failures)
    ds.write_parquet(
        ray_path(cfg.output.path),
        filesystem=filesystem_for(cfg.output.path, storage),
        # A write task commits its rows' ids once its files are written: bundling up to
        # max_rows_per_file rows per task makes that the most a crash can take back.
        min_rows_per_file=cfg.output.max_rows_per_file,
        max_rows_per_file=cfg.output.max_rows_per_file,
        mode=SaveMode.APPEND,  # output.mode was applied before (run_job)
        ray_remote_args={"num_cpus": io_cpus},
    )


def _ray_file(root: str, fs_file: str) -> str:
    """A file path as the filesystem lists it -> as Ray takes it (``s3://`` kept for URIs)."""
    return f"{urlparse(root).scheme}://{fs_file}" if is_uri(root) else fs_file


def _check_output(cfg: JobConfig, identity: dict[str, Any]) -> dict[str, Any] | None:
    """Check ``output.mode`` against what the output holds, reading only (``overwrite`` deletes
    later, once the output is claimed); returns the previous attempt's manifest when resuming."""
    out, storage = cfg.output.path, cfg.storage
    if cfg.output.mode == "overwrite" or not has_files(out, storage):
        return None
    if cfg.output.mode == "error":
        raise ConfigError(
            f"output.path {out!r} already holds files and output.mode is 'error': resume that run with --resume "
            "(output.mode: resume), replace it with output.mode: overwrite, or choose a new output path"
        )
    previous = read_manifest(out, storage)
    if previous is None:
        raise ConfigError(
            f"output.path {out!r} holds files but no {MANIFEST_NAME}: it is not a run of this job, so it cannot be "
            "resumed; choose a new output path or set output.mode: overwrite"
        )
    differ = _differences(previous.get("run_identity") or {}, identity)
    if differ:
        raise ConfigError(
            f"cannot resume {out!r}: the earlier attempt ran with different settings ({'; '.join(differ)}); "
            "resume with the same config, or write to a new output path"
        )
    return previous


def run_identity(cfg: JobConfig) -> dict[str, Any]:
    """What decides each output row; a resume must match the earlier attempts on all of it."""
    keep = ("path", "max_image_pixels", "min_image_side", "id_policy", "max_prompt_tokens", "long_prompt")
    return {
        "input": {k: v for k, v in cfg.input.model_dump(mode="json").items() if k in keep},
        "model": cfg.model.model_dump(mode="json", exclude={"architecture"}),
        "pruning": cfg.pruning.model_dump(mode="json"),
        "generation": cfg.generation.model_dump(mode="json"),
        "engine": cfg.decode_stage.engine,  # engines agree on greedy answers, but numerics may differ
    }


def _differences(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} then, {b!r} now")
    return out


def committed_rows(checkpoint: str, storage: StorageConfig | None = None) -> int:
    """Rows whose ids an earlier attempt committed (pending, uncommitted writes excluded)."""
    fs, root = local_or(filesystem_for(checkpoint, storage)), fs_path(checkpoint)

    def count() -> int:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        files = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                 and not i.path.endswith(".pending.parquet")]
        return pads.dataset(files, filesystem=fs, format="parquet").count_rows() if files else 0

    return retrying(count, f"reading the checkpoint {checkpoint}", storage)


def cost_model(cfg: JobConfig) -> CostModel:
    """FLOP/KV shapes from the checkpoint's own config, prices from the table, the LLM's dtype as
    the decode actors will resolve it."""
    try:
        shapes = model_shapes(resolve_model_path(cfg.model.path, cfg.storage, metadata_only=True), cfg.model.family)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path {cfg.model.path!r}: cannot read its config for cost accounting: {e}") from e
    kv_bytes = torch.empty(0, dtype=planned_dtype(cfg.model, cfg.decode_stage.num_gpus)).element_size()
    return CostModel.for_job(cfg, shapes, kv_bytes)


def build_pipeline(
    ds: ray.data.Dataset, cfg: JobConfig, costs: CostModel | None = None, engine: EngineEnvironment | None = None,
    failures: Any = None,
) -> ray.data.Dataset:
    """The three stages and the cost/schema step on ``ds``. The decode actors run in the engine's
    interpreter (``engine``: resolved from ``cfg.decode_stage`` when not given) and record engine
    failures in ``failures`` (an ``EngineFailureLedger``; None: the restart budget is not enforced)."""
    retries = cfg.ray.max_task_retries
    engine = engine or engine_environment(cfg.decode_stage)
    ds = ds.map_batches(TextStage, fn_constructor_kwargs={"cfg": cfg.text_stage}, **_pool(cfg.text_stage, retries))
    ds = ds.map_batches(
        EncodeStage,
        fn_constructor_kwargs={
            "model": cfg.model, "pruning": cfg.pruning, "inputs": cfg.input, "stage": cfg.encode_stage,
            "storage": cfg.storage,
        },
        **_pool(cfg.encode_stage, retries),
    )
    ds = ds.map_batches(
        DecodeStage,
        fn_constructor_kwargs={
            "model": cfg.model, "generation": cfg.generation, "inputs": cfg.input, "stage": cfg.decode_stage,
            "storage": cfg.storage, "failures": failures,
        },
        **_pool(cfg.decode_stage, retries, engine.runtime_env()),
    )
    return ds.map_batches(
        finalize, fn_kwargs={"costs": costs or cost_model(cfg)},
        batch_format="numpy", batch_size=None, num_cpus=cfg.ray.io_num_cpus,
    )


def finalize(batch: dict[str, Any], costs: CostModel) -> Any:
    """Cost columns from each row's lengths and stage times, then the output schema, in one
    task: a separate map would round-trip the ragged list columns through Arrow in between."""
    return to_output_table(costs(batch))


def _pool(stage: StageConfig, max_task_retries: int, runtime_env: dict[str, Any] | None = None) -> dict:
    compute = (
        ActorPoolStrategy(min_size=stage.pool_size, max_size=stage.max_pool_size)
        if stage.max_pool_size
        else ActorPoolStrategy(size=stage.pool_size)
    )
    return {
        "compute": compute,
        "batch_size": stage.batch_size,
        "num_cpus": stage.num_cpus,
        "num_gpus": stage.num_gpus,
        "batch_format": "numpy",
        # Dead actors restart without bound (a long run loses nodes); a batch is retried a bounded
        # number of times, so a row that kills its actor every time cannot loop forever.
        "max_restarts": -1,
        "max_task_retries": max_task_retries,
        **({"runtime_env": runtime_env} if runtime_env else {}),
    }


def check_resources(cfg: JobConfig, cluster: dict[str, float], checkpoint_filter: bool = False) -> None:
    """Fail fast if the pools cannot all start next to a read/write task: Ray Data would wait
    forever. ``checkpoint_filter``: a resume, which adds Ray Data's checkpoint filter actor."""
    stages = cfg.stages()
    filter_cpus = CHECKPOINT_FILTER_CPUS if checkpoint_filter else 0.0
    cpus = cfg.ray.io_num_cpus + filter_cpus + sum(s.pool_size * s.num_cpus for s in stages.values())
    have_cpus = cluster.get("CPU", 0.0)
    if cpus > have_cpus + 1e-9:
        parts = " + ".join(f"{n}.pool_size*num_cpus={s.pool_size * s.num_cpus:g}" for n, s in stages.items())
        resume = f" + the resume's checkpoint filter actor {filter_cpus:g}" if filter_cpus else ""
        raise ConfigError(
            f"the stages need {cpus:g} CPUs ({parts} + ray.io_num_cpus={cfg.ray.io_num_cpus:g}{resume}) but the "
            f"cluster has {have_cpus:g}: lower num_cpus (fractions are fine) or pool_size"
        )
    gpus = sum(s.pool_size * s.num_gpus for s in stages.values())
    have_gpus = cluster.get("GPU", 0.0)
    if gpus > have_gpus + 1e-9:
        asks = ", ".join(f"{n}.num_gpus={s.num_gpus:g}" for n, s in stages.items() if s.num_gpus)
        raise ConfigError(
            f"the stages need {gpus:g} GPUs ({asks}) but the cluster has {have_gpus:g}; "
            "set num_gpus: 0 to run on CPU"
        )


def read_output_rows(output: str, storage: StorageConfig | None = None) -> list[dict[str, Any]]:
    """The columns the summary and manifest need, read back from what was written."""
    time_columns = [c for cols in STAGE_TIME_COLUMNS.values() for c in cols]
    columns = ["id", "prompt", "answer", "error", "extractor", "visual_tokens_in", "visual_tokens_kept",
               "prompt_truncated", *time_columns, *COST_COLUMNS]
    ds = parquet_dataset(output, storage)
    columns += [c for c in ("energy_explained", "expected", "question_type") if c in ds.schema.names]
    return retrying(lambda: ds.to_table(columns=columns).to_pylist(), f"reading back {output}", storage)


def summarize(
    rows: list[dict[str, Any]], plan: InputPlan, already_done: int, output: str, run_cost: dict[str, Any]
) -> JobSummary:
    ok = [r for r in rows if not r["error"]]
    distinct = len({r["id"] for r in rows})

    def mean(key: str) -> float:
        return round(sum(r[key] for r in ok) / len(ok), 3) if ok else 0.0

    labelled = bool(rows) and all(r.get("expected") is not None for r in rows)
    first = heapq.nsmallest(EXAMPLES, rows, key=lambda r: r["id"])
    # and a few captions, which a person reads differently from one-word answers
    first += heapq.nsmallest(CAPTION_EXAMPLES, [r for r in rows if is_caption(r) and r not in first], key=lambda r: r["id"])
    scores = label_scores(rows) if labelled else {}
    return JobSummary(
        input_rows=plan.rows,
        expected_rows=plan.expected_rows,
        output_rows=len(rows),
        ok_rows=len(ok),
        error_rows=len(rows) - len(ok),
        errors_by_kind=dict(Counter(r["error"].split(":")[0] for r in rows if r["error"])),
        dropped=dict(plan.dropped),
        skipped_already_done=already_done,
        written_this_attempt=len(rows) - already_done,
        missing_ids=max(0, plan.expected_rows - distinct),
        duplicate_ids=len(rows) - distinct,
        truncated_prompts=sum(bool(r["prompt_truncated"]) for r in rows),
        extractors=dict(Counter(r["extractor"] for r in rows)),
        mean_visual_tokens_in=mean("visual_tokens_in"),
        mean_visual_tokens_kept=mean("visual_tokens_kept"),
        visual_tokens_kept=per_image_stats([r["visual_tokens_kept"] for r in ok]),
        energy_explained=per_image_stats([r["energy_explained"] for r in ok if r.get("energy_explained") is not None]),
        mean_stage_ms={k: mean(k) for k in ("text_ms", "encode_ms", "prune_ms", "decode_ms")},
        output=output,
        wall_seconds=round(run_cost["reserved"]["wall_seconds"], 3),
        accelerator=run_cost["accelerator"],
        cost_totals=run_cost["totals"],
        cost_mean_per_image=run_cost["mean_per_image"],
        reserved_usd=run_cost["reserved"]["usd"],
        utilisation=run_cost["reserved"]["utilisation"],
        accuracy=None if scores.get("accuracy") is None else round(scores["accuracy"], 4),
        caption_f1=None if scores.get("caption_f1") is None else round(scores["caption_f1"], 4),
        examples=[{k: r[k] or "" for k in ("id", "prompt", "answer", "error", "expected") if k in r} for r in first],
    )


def _prepare_local_input(cfg: JobConfig) -> None:
    path = cfg.input.path
    if is_uri(path) or Path(path).exists():
        return
    if cfg.input.create_sample_rows is None:
        raise ConfigError(f"input.path {path!r} does not exist")
    log.info("writing the sample corpus (%d rows) to %s", cfg.input.create_sample_rows, path)
    write_corpus(path, rows=cfg.input.create_sample_rows)


def _resolve_model(cfg: JobConfig) -> tuple[JobConfig, str]:
    """Locate the checkpoint (for an S3 prefix, its JSON files only) and pick its adapter once, in
    the driver, so a bad path fails here with the field named, not as failing actors. Returns the
    config with the family and alpha filled in, and the driver's local path. ``model.path`` stays
    as configured: every actor resolves it on its own node (``pipeline.models.sources``)."""
    try:
        path = resolve_model_path(cfg.model.path, cfg.storage, metadata_only=True)
        family = detect_family(path) if cfg.model.family == "auto" else cfg.model.family
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path {cfg.model.path!r}: {e}") from e
    # The family's default alpha is written into the config, so the manifest records what was applied.
    pruning = cfg.pruning.model_copy(update={"alpha": cfg.pruning.alpha_for(ADAPTERS[family].default_alpha)})
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"family": family}), "pruning": pruning}), path


@ray.remote(num_cpus=0)
class _OutputClaim:
    """A named actor, named after an output, held by the driver writing it. Ray refuses a second
    actor of the same name, so a second driver on the cluster (a scheduled run that overlaps the
    last one, a manual --resume) cannot write the same output; the actor dies with its driver,
    so a killed run leaves no stale claim."""

    def ready(self) -> bool:
        return True


def _claim_output(output: str) -> Any:
    """Claim ``output`` on this Ray cluster for as long as the returned handle is held."""
    key = output.rstrip("/") if is_uri(output) else os.path.abspath(output)
    try:
        claim = _OutputClaim.options(name=f"output:{key}", namespace=CLAIM_NAMESPACE).remote()
    except ValueError as e:  # "The name ... is already taken"
        raise OutputBusy(
            f"another driver on this Ray cluster is writing {output}: wait for it to end (or stop it: "
            "`ray job list`, `ray job stop`), then run again with --resume"
        ) from e
    ray.get(claim.ready.remote(), timeout=120)
    return claim


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _init_ray(cfg: JobConfig) -> None:
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

