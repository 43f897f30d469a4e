"""Orchestration: Parquet in -> text (CPU pool) -> encode+prune (GPU pool) -> decode (GPU pool)
-> Parquet out, then a summary read back from the output. Processing lives in ``stages``."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
import ray.data
from ray.data import ActorPoolStrategy, SaveMode

from pipeline.config import ConfigError, JobConfig, StageConfig
from pipeline.io.sample_corpus import write_corpus
from pipeline.io.schema import INPUT_COLUMNS, to_output_table
from pipeline.io.storage import filesystem_for, has_files, is_uri, parquet_dataset, ray_path
from pipeline.models import detect_family
from pipeline.models.tiny import resolve_model_path
from pipeline.stages.decode import DecodeStage
from pipeline.stages.encode import EncodeStage
from pipeline.stages.text import TextStage

log = logging.getLogger(__name__)


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
    cfg = _resolve_model(cfg)
    _init_ray(cfg)
    if cfg.ray.check_resources:
        check_resources(cfg, ray.cluster_resources())

    # Ray 2.60's DataSource V2 read adds a ListFiles task that always reserves 1 CPU, ignoring
    # num_cpus: with the pools sized to a 2-CPU machine that task never schedules and the job
    # hangs. The classic reader honours num_cpus.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    ds = ray.data.read_parquet(
        ray_path(cfg.input.path),
        filesystem=filesystem_for(cfg.input.path),
        num_cpus=cfg.ray.io_num_cpus,
    )
    ds = build_pipeline(ds, cfg)
    ds.write_parquet(
        ray_path(cfg.output.path),
        filesystem=filesystem_for(cfg.output.path),
        max_rows_per_file=cfg.output.max_rows_per_file,
        mode=SaveMode.OVERWRITE if cfg.output.mode == "overwrite" else SaveMode.ERROR,
        ray_remote_args={"num_cpus": cfg.ray.io_num_cpus},
    )
    return summarize(cfg.output.path, input_rows)


def build_pipeline(ds: ray.data.Dataset, cfg: JobConfig) -> ray.data.Dataset:
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
    return ds.map_batches(to_output_table, batch_format="numpy", batch_size=None, num_cpus=cfg.ray.io_num_cpus)


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
    stages = {"text_stage": cfg.text_stage, "encode_stage": cfg.encode_stage, "decode_stage": cfg.decode_stage}
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


def summarize(output: str, input_rows: int) -> JobSummary:
    columns = ["error", "extractor", "visual_tokens_in", "visual_tokens_kept", "text_ms", "encode_ms", "prune_ms", "decode_ms"]
    table = parquet_dataset(output).to_table(columns=columns)
    rows = table.to_pylist()
    ok = [r for r in rows if not r["error"]]

    def mean(key: str) -> float:
        return round(sum(r[key] for r in ok) / len(ok), 3) if ok else 0.0

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
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": path, "family": family})})


def _init_ray(cfg: JobConfig) -> None:
    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address)
    elif os.environ.get("RAY_ADDRESS"):  # set by `ray job submit` and by users pointing at a cluster
        ray.init()
    else:  # a fresh local instance; never silently join some other local cluster
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False)

