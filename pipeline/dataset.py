"""Step 3 of a run, ``execute``: the Ray Data dataset. Parquet in -> text (CPU pool) ->
prepare images (CPU pool) -> encode+prune (GPU pool) -> decode (GPU pool) -> cost columns and the output schema -> Parquet
out, checkpointed on ``id``. The processing itself lives in ``pipeline.stages``."""

from __future__ import annotations

from typing import Any

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray
import ray.data
from ray.data import ActorPoolStrategy, SaveMode
from ray.data.checkpoint import CheckpointConfig

from pipeline.config import JobConfig, StageConfig
from pipeline.cost.accounting import CostModel
from pipeline.engines import EngineEnvironment, engine_environment
from pipeline.io import formats
from pipeline.io.fetch import fetch_images
from pipeline.io.inputs import drop_rows, first_of_repeated, keep_first_of_repeated, stage_first_rows, stage_listing
from pipeline.io.schema import to_output_table
from pipeline.io.storage import Location, locate
from pipeline.plan import JobPlan, cost_model
from pipeline.stages.decode import DecodeStage
from pipeline.stages.encode import EncodeStage
from pipeline.stages.prepare import PrepareStage
from pipeline.stages.text import TextStage
from pipeline.tasks import TaskSpec, task_spec


def execute(plan: JobPlan, failures: Any) -> None:
    """Read -> stages -> write, checkpointed on ``id`` under ``plan.checkpoint``; decode actors
    record engine failures in ``failures`` (an ``EngineFailureLedger``)."""
    context = ray.data.DataContext.get_current()
    # Ray 2.60's DataSource V2 read adds a ListFiles task that always reserves 1 CPU, ignoring
    # num_cpus: with the pools sized to a 2-CPU machine that task never schedules and the job
    # hangs. The classic reader honours num_cpus.
    context.use_datasource_v2 = False
    # Kept after success: a resume of a finished run then finds every id done and writes nothing.
    checkpoint = plan.checkpoint
    context.checkpoint_config = CheckpointConfig(
        id_column="id", checkpoint_path=checkpoint.ray_path, delete_checkpoint_on_success=False,
        override_filesystem=checkpoint.arrow_filesystem,
    )
    try:
        _read_process_write(plan, failures)
    finally:  # the process may run more datasets (the evaluation grid): none inherits this run's checkpoint
        context.checkpoint_config = None


def _read_process_write(plan: JobPlan, failures: Any) -> None:
    cfg, io_cpus, out = plan.cfg, plan.cfg.ray.io_num_cpus, plan.output
    ds = build_pipeline(read_input(plan), cfg, plan.costs, plan.engine, failures, plan.model)
    ds.write_parquet(
        out.ray_path,
        filesystem=out.arrow_filesystem,
        # A write task commits its rows' ids once its files are written: bundling up to
        # max_rows_per_file rows per task makes that the most a crash can take back.
        min_rows_per_file=cfg.output.max_rows_per_file,
        max_rows_per_file=cfg.output.max_rows_per_file,
        mode=SaveMode.APPEND,  # output.mode was applied before (pipeline.job.claim)
        ray_remote_args={"num_cpus": io_cpus},
    )


def read_input(plan: JobPlan) -> ray.data.Dataset:
    """The rows the stages take (``id``, ``image`` bytes or null with ``image_error``, the prompt
    or the columns a task spec's prompts read, pass-through columns), in ``input.format``.
    Every branch starts at a Ray Data read that yields ``id``, so the checkpoint filter applies."""
    cfg, inputs, io_cpus, source = plan.cfg, plan.inputs, plan.cfg.ray.io_num_cpus, plan.input
    if inputs.format == "parquet":
        ds = ray.data.read_parquet([source.ray_file(f) for f in inputs.files], filesystem=source.arrow_filesystem,
                                   num_cpus=io_cpus)
        if inputs.dropped:
            ds = ds.map_batches(
                drop_rows, fn_kwargs={"excluded": frozenset(inputs.excluded_ids)},
                batch_format="pyarrow", batch_size=None, num_cpus=io_cpus,
            )
        staged = stage_first_rows(inputs, plan.output)
        if staged:  # a second read, so the checkpoint filter covers both branches
            ds = ds.union(ray.data.read_parquet(staged.ray_path, filesystem=staged.arrow_filesystem, num_cpus=io_cpus))
    elif inputs.format == "files":
        listing = stage_listing(inputs, plan.output)
        ds = ray.data.read_parquet(listing.ray_path, filesystem=listing.arrow_filesystem, num_cpus=io_cpus)
        if inputs.dropped:
            ds = ds.map_batches(keep_first_of_repeated, fn_kwargs={"first": first_of_repeated(inputs)},
                                batch_format="pyarrow", batch_size=None, num_cpus=io_cpus)
    else:
        stage_listing(inputs, plan.output)
        ds = ray.data.read_datasource(
            formats.tar_shards_datasource(source, inputs.files, cfg.input.extensions, inputs.columns[2:], inputs.skip),
            num_cpus=io_cpus)
    column = "image" if inputs.format == "files" else cfg.input.image_column
    if column:
        # A listing (or a Parquet shard) reads as a few large blocks; cut into fetch-sized ones
        # (streaming, no shuffle), fetches spread over the cluster and rows flow on as they arrive.
        rows = cfg.input.fetch_concurrency
        ds = ds.repartition(target_num_rows_per_block=rows).map_batches(
            fetch_images, fn_kwargs={"reader": plan.images, "column": column}, batch_format="pyarrow",
            batch_size=rows, num_cpus=io_cpus)
    if cfg.input.prompt:
        ds = ds.map_batches(formats.add_prompt, fn_kwargs={"prompt": cfg.input.prompt}, batch_format="pyarrow",
                            batch_size=None, num_cpus=io_cpus)
    return ds


def build_pipeline(
    ds: ray.data.Dataset, cfg: JobConfig, costs: CostModel | None = None, engine: EngineEnvironment | None = None,
    failures: Any = None, model: Location | None = None,
) -> ray.data.Dataset:
    """The four stages and the cost/schema step on ``ds``. The decode actors run in the engine's
    interpreter (``engine``: resolved from ``cfg.decode_stage`` when not given) and record engine
    failures in ``failures`` (an ``EngineFailureLedger``; None: the restart budget is not enforced).
    ``model``: where the checkpoint is (``model.path`` located with ``storage`` when not given)."""
    retries = cfg.ray.max_task_retries
    engine = engine or engine_environment(cfg.decode_stage)
    model = model or locate(cfg.model.path, cfg.storage)
    spec = task_spec(cfg)
    ds = ds.map_batches(TextStage, fn_constructor_kwargs={"cfg": cfg.text_stage, "tasks": spec.tasks},
                        **_pool(cfg.text_stage, retries))
    ds = ds.map_batches(
        PrepareStage,
        fn_constructor_kwargs={"model": cfg.model, "inputs": cfg.input, "stage": cfg.prepare_stage, "source": model},
        **_pool(cfg.prepare_stage, retries),
    )
    ds = ds.map_batches(
        EncodeStage,
        fn_constructor_kwargs={"model": cfg.model, "pruning": cfg.pruning, "stage": cfg.encode_stage, "source": model},
        **_pool(cfg.encode_stage, retries),
    )
    ds = ds.map_batches(
        DecodeStage,
        fn_constructor_kwargs={
            "model": cfg.model, "generation": cfg.generation, "inputs": cfg.input, "stage": cfg.decode_stage,
            "tasks": spec.tasks, "source": model, "failures": failures,
        },
        **_pool(cfg.decode_stage, retries, engine.runtime_env()),
    )
    return ds.map_batches(
        finalize, fn_kwargs={"costs": costs or cost_model(cfg), "spec": spec},
        batch_format="numpy", batch_size=None, num_cpus=cfg.ray.io_num_cpus,
    )


def finalize(batch: dict[str, Any], costs: CostModel, spec: TaskSpec | None = None) -> Any:
    """Cost columns from each row's lengths and stage times, then the output schema, in one
    task: a separate map would round-trip the ragged list columns through Arrow in between."""
    return to_output_table(costs(batch), spec)


def _pool(stage: StageConfig, max_task_retries: int, runtime_env: dict[str, Any] | None = None) -> dict:
    # Several calls per actor overlap Ray's batching (fetch, Arrow <-> numpy) with the running
    # call; the call itself stays single-threaded (enable_true_multi_threading off): one model.
    sizes = {"min_size": stage.pool_size, "max_size": stage.max_pool_size} if stage.max_pool_size else {"size": stage.pool_size}
    compute = ActorPoolStrategy(**sizes, max_concurrent_calls_per_actor=stage.calls_per_actor)
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


def committed_rows(checkpoint: Location) -> int:
    """Rows whose ids an earlier attempt committed (pending, uncommitted writes excluded)."""
    fs = checkpoint.fs

    def count() -> int:
        files = [i.path for i in checkpoint.list_dir() if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                 and not i.path.endswith(".pending.parquet")]
        return pads.dataset(files, filesystem=fs, format="parquet").count_rows() if files else 0

    return checkpoint.retrying(count, f"reading the checkpoint {checkpoint.uri}")
