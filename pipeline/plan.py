"""Step 1 of a run, ``prepare``: everything decided before Ray starts, in one frozen ``JobPlan``.

It reads (never writes) storage and the checkpoint's configs: the run's identity, what the
output holds (``output.mode`` checked against it), the input plan (schemas and ids), the model's
family and the alpha applied, the cost model and the decode engine's environment. A bad field
fails here as a ``ConfigError`` naming it, before any worker starts. Nothing here needs Ray.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError, InputConfig, JobConfig
from pipeline.cost import cpu_side
from pipeline.cost.accounting import CostModel
from pipeline.engines import EngineEnvironment, engine_environment
from pipeline.io.fetch import ObjectReader, object_reader
from pipeline.io.inputs import InputPlan, plan_input, read_staged_listing
from pipeline.io.manifest import MANIFEST_NAME, read_manifest
from pipeline.io.runs import IncrementalRun
from pipeline.io.storage import Location, locate
from pipeline.models import ADAPTERS, detect_family, model_shapes, token_counts
from pipeline.models.base import planned_dtype
from pipeline.models.sources import resolve_model_path
from pipeline.tasks import task_fields, template_columns

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "_checkpoint"  # under the output: Ray Data's record of committed ids


@dataclass(frozen=True)
class JobPlan:
    """A run, fully resolved: what every later step reads (and nothing re-resolves)."""

    cfg: JobConfig  # validated; model.family and pruning.alpha filled in; an incremental run's output path
    identity: dict[str, Any]  # what decides each output row (a resume must match it)
    input: Location  # input.path (format files: the first of its prefixes)
    output: Location
    model: Location  # model.path as configured: every actor resolves it on its own node
    model_path: str  # the driver's local copy (an S3 checkpoint's JSON files only)
    inputs: InputPlan
    costs: CostModel
    engine: EngineEnvironment
    previous: dict[str, Any] | None  # the manifest of the run being resumed
    incremental: IncrementalRun | None = None
    incremental_root: str | None = None
    warnings: tuple[str, ...] = ()  # logged when planned, kept in the manifest (never errors)
    images: ObjectReader | None = None  # reads images by reference (format files, input.image_column)

    @property
    def checkpoint(self) -> Location:
        return self.output.child(CHECKPOINT_DIR)

    def manifest_base(self, attempt: dict[str, Any], packages: dict[str, str | None]) -> dict[str, Any]:
        """The manifest's fields that this attempt's plan decides (``pipeline.io.manifest``)."""
        cfg, run = self.cfg, self.incremental
        return {
            "attempt": attempt["attempt"],
            "started_at": attempt["started_at"],
            "run_identity": self.identity,
            "config": cfg.model_dump(mode="json"),
            "packages": packages,
            "input": {"format": self.inputs.format, "files": len(self.inputs.files), "rows": self.inputs.rows,
                      "dropped": self.inputs.dropped, **self.inputs.manifest_fields(),
                      **({"shards": run.shards} if run and run.shards is not None else {})},
            **({"incremental": {"root": self.incremental_root, "resumed": run.resumed,
                                "earlier_runs": run.earlier_runs,
                                ("files_taken_before" if run.shards is None else "shards_taken_before"):
                                    run.shards_taken_before}}
               if run else {}),
            "model": {"configured_path": cfg.model.path, "path": self.model_path, "family": cfg.model.family,
                      "kv_bytes_per_element": self.costs.kv_bytes_per_element},
            "engine": self.engine.as_dict(),
            "warnings": list(self.warnings),
        }


def prepare(cfg: JobConfig, incremental: IncrementalRun | None = None) -> JobPlan:
    """The plan for ``cfg`` (``incremental``: the run ``pipeline.io.runs.plan_incremental`` chose
    under ``output.path``, a root of runs)."""
    root = None
    if incremental is not None:
        root = cfg.output.path
        output = cfg.output.model_copy(update={"path": incremental.output.uri, "mode": "resume", "incremental": False})
        cfg = cfg.model_copy(update={"output": output})
    roots, out = [locate(p, cfg.storage) for p in cfg.input.paths], locate(cfg.output.path, cfg.storage)
    identity = run_identity(cfg)
    previous = check_output(cfg, out, identity)
    for where in roots:
        if not where.is_remote and not Path(where.uri).exists():
            raise ConfigError(f"input.path {where.uri!r} does not exist")
    check_constraints(cfg)  # a JSON Schema the grammar library cannot take fails here, before Ray
    # A resume reads what its first attempt listed, so files landing since then wait for another run.
    staged = read_staged_listing(out) if previous is not None else None
    units = (incremental.listing if incremental.listing is not None else incremental.shards) if incremental else None
    inputs = plan_input(cfg.input, roots, units, prompt_columns(cfg), staged)
    check_task_columns(cfg, inputs.columns)
    model = locate(cfg.model.path, cfg.storage)
    cfg, model_path = resolve_model(cfg, model)
    costs = cost_model(cfg, model_path)  # reads the price table: a bad accelerator or price file fails before Ray starts
    engine = engine_environment(cfg.decode_stage)  # a missing vLLM environment fails here, naming the field
    warnings = tuple(w for w in (check_prepare_pool(cfg, model_path, costs), *inputs.problems) if w)
    for warning in warnings:
        log.warning("%s", warning)
    images = object_reader(cfg.storage, cfg.input) if cfg.input.format == "files" or cfg.input.image_column else None
    return JobPlan(cfg, identity, roots[0], out, model, model_path, inputs, costs, engine, previous, incremental, root,
                   warnings, images)


def run_identity(cfg: JobConfig) -> dict[str, Any]:
    """What decides each output row; a resume must match the earlier attempts on all of it."""
    # jpeg_draft_margin decides the pixels the model sees; a run from before it existed decoded every pixel (null).
    keep = ("path", "max_image_pixels", "min_image_side", "id_policy", "max_prompt_tokens", "long_prompt",
            "jpeg_draft_margin")
    # The reading fields count only away from their defaults: a Parquet run from before they existed resumes.
    reading = ("format", "extensions", "prompt", "image_column", "image_root", "max_image_bytes")
    defaults = InputConfig(path="").model_dump(mode="json")
    return {
        "input": {k: v for k, v in cfg.input.model_dump(mode="json").items()
                  if k in keep or (k in reading and v != defaults[k])},
        "model": cfg.model.model_dump(mode="json", exclude={"architecture"}),
        "pruning": cfg.pruning.model_dump(mode="json"),
        "generation": cfg.generation.model_dump(mode="json"),
        "engine": cfg.decode_stage.engine,  # engines agree on greedy answers, but numerics may differ
        # Only with a task spec: a run without one keeps the identity runs had before tasks existed.
        **({"tasks": [t.model_dump(mode="json", by_alias=True) for t in cfg.tasks]} if cfg.tasks else {}),
    }


def prompt_columns(cfg: JobConfig) -> dict[str, str] | None:
    """The input columns a task spec's prompts read, each with the field that names it first
    (None without a task spec: the ``prompt`` column, as always)."""
    if not cfg.tasks:
        return None
    columns: dict[str, str] = {}
    for k, task in enumerate(cfg.tasks):
        for c in template_columns(task.prompt):
            columns.setdefault(c, f"tasks.{k}.prompt")
    return columns


def check_task_columns(cfg: JobConfig, input_columns: list[str]) -> None:
    """A task's output column must not be an input column (input columns pass through to the output)."""
    for k, task in enumerate(cfg.tasks or ()):
        clash = [f.name for f in task_fields(task) if f.name in input_columns]
        if clash:
            raise ConfigError(f"tasks.{k}.name: {task.name!r} would write column(s) {clash} that the input already "
                              "has (input columns pass through to the output); choose another name")


def check_constraints(cfg: JobConfig) -> None:
    """Compile every ``json`` task's schema with the grammar library both engines constrain with
    (xgrammar): a valid JSON Schema it cannot take fails now, naming the task, not on the GPUs."""
    tasks = [(k, t) for k, t in enumerate(cfg.tasks or ()) if t.type == "json"]
    if not tasks:
        return
    import xgrammar as xgr

    for k, task in tasks:
        try:
            xgr.Grammar.from_json_schema(json.dumps(task.json_schema), any_whitespace=False)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError or its own errors
            raise ConfigError(f"tasks.{k}.schema: the constrained decoders cannot take this JSON Schema: "
                              f"{str(e).strip()[:300]}") from None


def check_output(cfg: JobConfig, out: Location, identity: dict[str, Any]) -> dict[str, Any] | None:
    """Check ``output.mode`` against what the output holds, reading only (``overwrite`` deletes
    later, once the output is claimed); returns the previous attempt's manifest when resuming."""
    if cfg.output.mode == "overwrite" or not out.has_files():
        return None
    if cfg.output.mode == "error":
        raise ConfigError(
            f"output.path {out.uri!r} already holds files and output.mode is 'error': resume that run with --resume "
            "(output.mode: resume), replace it with output.mode: overwrite, or choose a new output path"
        )
    previous = read_manifest(out)
    if previous is None:
        raise ConfigError(
            f"output.path {out.uri!r} holds files but no {MANIFEST_NAME}: it is not a run of this job, so it cannot "
            "be resumed; choose a new output path or set output.mode: overwrite"
        )
    differ = _differences(previous.get("run_identity") or {}, identity)
    if differ:
        raise ConfigError(
            f"cannot resume {out.uri!r}: the earlier attempt ran with different settings ({'; '.join(differ)}); "
            "resume with the same config, or write to a new output path"
        )
    return previous


def _differences(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} then, {b!r} now")
    return out


def resolve_model(cfg: JobConfig, model: Location) -> tuple[JobConfig, str]:
    """Locate the checkpoint (for an S3 prefix, its JSON files only) and pick its adapter once, in
    the driver, so a bad path fails here with the field named, not as failing actors. Returns the
    config with the family and alpha filled in, and the driver's local path. ``model.path`` stays
    as configured: every actor resolves it on its own node (``pipeline.models.sources``)."""
    try:
        path = resolve_model_path(model, metadata_only=True)
        family = detect_family(path) if cfg.model.family == "auto" else cfg.model.family
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path {cfg.model.path!r}: {e}") from e
    # The family's default alpha is written into the config, so the manifest records what was applied.
    pruning = cfg.pruning.model_copy(update={"alpha": cfg.pruning.alpha_for(ADAPTERS[family].default_alpha)})
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"family": family}), "pruning": pruning}), path


def cost_model(cfg: JobConfig, model_path: str | None = None) -> CostModel:
    """FLOP/KV shapes from the checkpoint's own config (``model_path``: the driver's local copy,
    already resolved; None: resolved here), prices from the table, the LLM's dtype as the decode
    actors will resolve it."""
    try:
        path = model_path or resolve_model_path(locate(cfg.model.path, cfg.storage), metadata_only=True)
        shapes = model_shapes(path, cfg.model.family)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path {cfg.model.path!r}: cannot read its config for cost accounting: {e}") from e
    kv_bytes = torch.empty(0, dtype=planned_dtype(cfg.model, cfg.decode_stage.num_gpus)).element_size()
    return CostModel.for_job(cfg, shapes, kv_bytes)


# Ray Data's checkpoint filter runs as an actor pool of its own; its actors reserve 1 CPU each
# (Ray's default for map actors; CheckpointConfig offers no knob) and 1 GiB of memory.
CHECKPOINT_FILTER_CPUS = 1.0


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


# The tables the preparation pool's check reads: the planner's defaults (no config field: they
# describe the hardware and the code, not the run).
ACCELERATOR_TABLE = "configs/accelerators.yaml"


def prepare_pool_warning(cfg: JobConfig, *, size: str, prepare_ms: float, gpu_images_per_second: float,
                         table_source: str = "configs/cpu_prepare.yaml") -> str | None:
    """The warning for a preparation pool that cannot feed the GPU pools it is paired with, or None.

    Both at full size (max_pool_size, else pool_size): the preparation pool's cores
    (``cpu_side.prepare_cores``: one thread per actor) shared among the GPUs of the GPU pools
    prepare ``cpu_images_per_second`` images of ``size`` (``prepare_ms`` CPU ms each) per GPU;
    below ``gpu_images_per_second`` (what one GPU takes at the config's budget), the GPUs wait on
    the CPUs. None without a GPU stage or cost.accelerator (a CPU-only run has no GPU to feed)."""
    gpus = cpu_side.gpus_at_full_size(cfg)
    if not gpus or not cfg.cost.accelerator:
        return None
    per_gpu = cpu_side.prepare_cores(cfg) / gpus
    cpu_rate = cpu_side.cpu_images_per_second(prepare_ms, per_gpu)
    if cpu_rate >= gpu_images_per_second:
        return None
    need = cpu_side.cores_per_gpu(prepare_ms, gpu_images_per_second)
    stage = cfg.prepare_stage
    return (
        f"prepare_stage cannot feed the GPU pools: at full size its {stage.max_pool_size or stage.pool_size} actors "
        f"x min(num_cpus {stage.num_cpus:g}, 1) = {cpu_side.prepare_cores(cfg):g} cores serve {gpus:g} GPUs, "
        f"{per_gpu:.3g} cores per GPU, which prepare {cpu_rate:.3g} images/s per GPU at {size} ({prepare_ms:g} CPU ms "
        f"an image: {table_source}), below the ~{gpu_images_per_second:.3g} images/s a {cfg.cost.accelerator} takes "
        f"at this budget (the planner's estimate): the GPUs would wait. Feeding them needs {need:.3g} cores per GPU, "
        f"e.g. prepare_stage num_cpus 1, max_pool_size {math.ceil(need * gpus)} "
        "(docs/cost-and-planner.md, The CPU side)"
    )


def check_prepare_pool(cfg: JobConfig, model_path: str, costs: CostModel) -> str | None:
    """``prepare_pool_warning`` for this config, at the CPU table's middle size for the family
    (``cpu_side.reference_size``: 1280x960, the size the cluster configs are sized at; the job
    knows no image size before it reads the corpus, and the largest measured size would warn on
    nearly any affordable config), the GPU's images/s estimated as the planner does at the
    config's budget (its cap when adaptive), the accelerator table's assumptions and at most
    generation.max_new_tokens generated tokens. Missing figures (a family or accelerator the
    tables lack, no table) skip the check, logged; it never fails the run."""
    from pipeline.cost import planner
    from pipeline.cost.prices import load_accelerators

    if not cpu_side.gpus_at_full_size(cfg) or not cfg.cost.accelerator or costs.accelerator_price is None:
        return None
    name, family = cfg.cost.accelerator, cfg.model.family
    try:
        table = cpu_side.load_cpu_table(cpu_side.DEFAULT_TABLE, "the CPU table")
        accelerators = load_accelerators(ACCELERATOR_TABLE)
        if family not in table.prepare_ms or name not in accelerators.accelerators:
            log.info("preparation pool check skipped: no figures for family %s in %s or accelerator %s in %s",
                     family, cpu_side.DEFAULT_TABLE, name, ACCELERATOR_TABLE)
            return None
        size = cpu_side.reference_size(table, family)
        n_visual, patches = token_counts(model_path, cfg.model, *cpu_side.parse_size(size), family)
        assume = accelerators.assumptions
        assume = assume.model_copy(update={"generated_tokens": min(assume.generated_tokens,
                                                                   cfg.generation.max_new_tokens)})
        row = planner.estimate(
            costs.shapes, model=cfg.model.path, method=cfg.pruning.method, keep=cfg.pruning.keep_for(n_visual),
            visual_tokens_in=n_visual, encoder_patches=patches, accelerator_name=name,
            accelerator=accelerators.accelerators[name], price=costs.accelerator_price, assume=assume, images=1,
            gpus=1, engine=cfg.decode_stage.engine, max_new_tokens=cfg.generation.max_new_tokens)
    except (OSError, ValueError, KeyError) as e:  # a ConfigError is a ValueError: a warning, never a failure
        log.info("preparation pool check skipped: %s", e)
        return None
    return prepare_pool_warning(cfg, size=size, prepare_ms=table.prepare_ms[family][size],
                                gpu_images_per_second=row.images_per_second_per_gpu,
                                table_source=f"{cpu_side.DEFAULT_TABLE}, {table.source()}")
