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

import ray
import ray.data
import torch
from ray.data import ActorPoolStrategy, SaveMode

from pipeline.config import ConfigError, JobConfig, StageConfig
from pipeline.cost.accounting import CostModel
from pipeline.io.manifest import package_versions, write_manifest
from pipeline.io.sample_corpus import write_corpus
from pipeline.io.schema import COST_COLUMNS, INPUT_COLUMNS, STAGE_TIME_COLUMNS, to_output_table
from pipeline.io.storage import filesystem_for, has_files, is_uri, parquet_dataset, ray_path
from pipeline.models import ADAPTERS, detect_family, model_shapes
from pipeline.models.base import planned_dtype
from pipeline.models.tiny import resolve_model_path
from pipeline.quality.scoring import is_correct
from pipeline.stages.decode import DecodeStage
from pipeline.stages.encode import EncodeStage
from pipeline.stages.text import TextStage

log = logging.getLogger(__name__)
EXAMPLES = 5  # rows the summary shows


@dataclass
class JobSummary:
    input_rows: int
    output_rows: int
    ok_rows: int
    error_rows: int
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    extractors: dict[str, int] = field(default_factory=dict)
    mean_visual_tokens_in: float = 0.0
    mean_visual_tokens_kept: float = 0.0
    mean_stage_ms: dict[str, float] = field(default_factory=dict)
    output: str = ""
    wall_seconds: float = 0.0  # read -> stages -> write, actor start-up included
    accelerator: str | None = None
    cost_totals: dict[str, float] = field(default_factory=dict)  # every cost column, summed over answered rows
    cost_mean_per_image: dict[str, float | None] = field(default_factory=dict)
    reserved_usd: float = 0.0  # what the run's reservation cost over wall_seconds
    utilisation: float | None = None  # share of reserved_usd the rows account for
    accuracy: float | None = None  # when the input has `expected`: normalised exact match over all rows
    examples: list[dict[str, str]] = field(default_factory=list)  # a few rows, for a person to check
    manifest: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def run_job(cfg: JobConfig) -> JobSummary:
    """Run the whole pipeline on ``cfg``; returns the summary of what was written."""
    if cfg.output.mode == "error" and has_files(cfg.output.path):
        raise ConfigError(
            f"output.path {cfg.output.path!r} already holds files and output.mode is 'error': "
            "choose a new output path or set output.mode: overwrite"
        )
    _prepare_local_input(cfg)
    # Schema and row count from the Parquet footers: cheap, and fails before any GPU work.
    source = parquet_dataset(cfg.input.path)
    missing = [c for c in INPUT_COLUMNS if c not in source.schema.names]
    if missing:
        raise ConfigError(f"input {cfg.input.path} lacks required column(s) {missing}; columns: {source.schema.names}")
    input_rows = source.count_rows()
    configured_model = cfg.model.path
    cfg = _resolve_model(cfg)
    costs = cost_model(cfg)  # reads the price table: a bad accelerator or price file fails before Ray starts
    _init_ray(cfg)
    if cfg.ray.check_resources:
        check_resources(cfg, ray.cluster_resources())
    started_at, start = _utc_now(), time.perf_counter()

    # Ray 2.60's DataSource V2 read adds a ListFiles task that always reserves 1 CPU, ignoring
    # num_cpus: with the pools sized to a 2-CPU machine that task never schedules and the job
    # hangs. The classic reader honours num_cpus.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    ds = ray.data.read_parquet(
        ray_path(cfg.input.path),
        filesystem=filesystem_for(cfg.input.path),
        num_cpus=cfg.ray.io_num_cpus,
    )
    ds = build_pipeline(ds, cfg, costs)
    ds.write_parquet(
        ray_path(cfg.output.path),
        filesystem=filesystem_for(cfg.output.path),
        max_rows_per_file=cfg.output.max_rows_per_file,
        mode=SaveMode.OVERWRITE if cfg.output.mode == "overwrite" else SaveMode.ERROR,
        ray_remote_args={"num_cpus": cfg.ray.io_num_cpus},
    )
    wall = time.perf_counter() - start
    rows = read_output_rows(cfg.output.path)
    run_cost = costs.run_totals(rows, wall, cfg.ray.io_num_cpus)
    summary = summarize(rows, input_rows, cfg.output.path, run_cost)
    summary.manifest = write_manifest(
        cfg.output.path,
        {
            "started_at": started_at,
            "finished_at": _utc_now(),
            "config": cfg.model_dump(mode="json"),
            "packages": package_versions(),
            "rows": {
                "input": summary.input_rows, "output": summary.output_rows, "ok": summary.ok_rows,
                "error": summary.error_rows, "errors_by_kind": summary.errors_by_kind,
            },
            "visual_tokens": {"mean_in": summary.mean_visual_tokens_in, "mean_kept": summary.mean_visual_tokens_kept},
            "model": {"configured_path": configured_model, "path": cfg.model.path, "family": cfg.model.family, "kv_bytes_per_element": costs.kv_bytes_per_element},
            "cost": run_cost,
        },
    )
    return summary


def cost_model(cfg: JobConfig) -> CostModel:
    """FLOP/KV shapes from the checkpoint's own config, prices from the table, the LLM's dtype as
    the decode actors will resolve it. ``cfg.model.path`` must already be resolved (``tiny:``)."""
    try:
        shapes = model_shapes(cfg.model.path, cfg.model.family)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path {cfg.model.path!r}: cannot read its config for cost accounting: {e}") from e
    kv_bytes = torch.empty(0, dtype=planned_dtype(cfg.model, cfg.decode_stage.num_gpus)).element_size()
    return CostModel.for_job(cfg, shapes, kv_bytes)


def build_pipeline(ds: ray.data.Dataset, cfg: JobConfig, costs: CostModel | None = None) -> ray.data.Dataset:
    ds = ds.map_batches(TextStage, fn_constructor_kwargs={"cfg": cfg.text_stage}, **_pool(cfg.text_stage))
    ds = ds.map_batches(
        EncodeStage,
        fn_constructor_kwargs={"model": cfg.model, "pruning": cfg.pruning, "inputs": cfg.input, "stage": cfg.encode_stage},
        **_pool(cfg.encode_stage),
    )
    ds = ds.map_batches(
        DecodeStage,
        fn_constructor_kwargs={"model": cfg.model, "generation": cfg.generation, "stage": cfg.decode_stage},
        **_pool(cfg.decode_stage),
    )
    return ds.map_batches(
        finalize, fn_kwargs={"costs": costs or cost_model(cfg)},
        batch_format="numpy", batch_size=None, num_cpus=cfg.ray.io_num_cpus,
    )


def finalize(batch: dict[str, Any], costs: CostModel) -> Any:
    """Cost columns from each row's lengths and stage times, then the output schema, in one
    task: a separate map would round-trip the ragged list columns through Arrow in between."""
    return to_output_table(costs(batch))


def _pool(stage: StageConfig) -> dict:
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
    }


def check_resources(cfg: JobConfig, cluster: dict[str, float]) -> None:
    """Fail fast if the pools cannot all start next to a read/write task: Ray Data would wait forever."""
    stages = cfg.stages()
    cpus = cfg.ray.io_num_cpus + sum(s.pool_size * s.num_cpus for s in stages.values())
    have_cpus = cluster.get("CPU", 0.0)
    if cpus > have_cpus + 1e-9:
        parts = " + ".join(f"{n}.pool_size*num_cpus={s.pool_size * s.num_cpus:g}" for n, s in stages.items())
        raise ConfigError(
            f"the stages need {cpus:g} CPUs ({parts} + ray.io_num_cpus={cfg.ray.io_num_cpus:g}) but the cluster "
            f"has {have_cpus:g}: lower num_cpus (fractions are fine) or pool_size"
        )
    gpus = sum(s.pool_size * s.num_gpus for s in stages.values())
    have_gpus = cluster.get("GPU", 0.0)
    if gpus > have_gpus + 1e-9:
        asks = ", ".join(f"{n}.num_gpus={s.num_gpus:g}" for n, s in stages.items() if s.num_gpus)
        raise ConfigError(
            f"the stages need {gpus:g} GPUs ({asks}) but the cluster has {have_gpus:g}; "
            "set num_gpus: 0 to run on CPU"
        )


def read_output_rows(output: str) -> list[dict[str, Any]]:
    """The columns the summary and manifest need, read back from what was written."""
    time_columns = [c for cols in STAGE_TIME_COLUMNS.values() for c in cols]
    columns = ["id", "prompt", "answer", "error", "extractor", "visual_tokens_in", "visual_tokens_kept",
               *time_columns, *COST_COLUMNS]
    ds = parquet_dataset(output)
    columns += [c for c in ("expected",) if c in ds.schema.names]
    return ds.to_table(columns=columns).to_pylist()


def summarize(rows: list[dict[str, Any]], input_rows: int, output: str, run_cost: dict[str, Any]) -> JobSummary:
    ok = [r for r in rows if not r["error"]]

    def mean(key: str) -> float:
        return round(sum(r[key] for r in ok) / len(ok), 3) if ok else 0.0

    labelled = bool(rows) and all(r.get("expected") is not None for r in rows)
    first = heapq.nsmallest(EXAMPLES, rows, key=lambda r: r["id"])
    return JobSummary(
        input_rows=input_rows,
        output_rows=len(rows),
        ok_rows=len(ok),
        error_rows=len(rows) - len(ok),
        errors_by_kind=dict(Counter(r["error"].split(":")[0] for r in rows if r["error"])),
        extractors=dict(Counter(r["extractor"] for r in rows)),
        mean_visual_tokens_in=mean("visual_tokens_in"),
        mean_visual_tokens_kept=mean("visual_tokens_kept"),
        mean_stage_ms={k: mean(k) for k in ("text_ms", "encode_ms", "prune_ms", "decode_ms")},
        output=output,
        wall_seconds=round(run_cost["reserved"]["wall_seconds"], 3),
        accelerator=run_cost["accelerator"],
        cost_totals=run_cost["totals"],
        cost_mean_per_image=run_cost["mean_per_image"],
        reserved_usd=run_cost["reserved"]["usd"],
        utilisation=run_cost["reserved"]["utilisation"],
        accuracy=round(sum(is_correct(r) for r in rows) / len(rows), 4) if labelled else None,
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


def _resolve_model(cfg: JobConfig) -> JobConfig:
    """Build or locate the checkpoint and pick its adapter once, in the driver: a bad path fails
    here with the field named, not as failing actors, and tiny builds do not race."""
    try:
        path = resolve_model_path(cfg.model.path)
        family = detect_family(path) if cfg.model.family == "auto" else cfg.model.family
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path {cfg.model.path!r}: {e}") from e
    # The family's default alpha is written into the config, so the manifest records what was applied.
    pruning = cfg.pruning.model_copy(update={"alpha": cfg.pruning.alpha_for(ADAPTERS[family].default_alpha)})
    return cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"path": path, "family": family}), "pruning": pruning}
    )


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _init_ray(cfg: JobConfig) -> None:
    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address)
    elif os.environ.get("RAY_ADDRESS"):  # set by `ray job submit` and by users pointing at a cluster
        ray.init()
    else:  # a fresh local instance; never silently join some other local cluster
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False)

