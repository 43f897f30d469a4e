"""Job configuration: one validated schema, documented here and nowhere else.

A YAML file (see ``configs/``) maps onto ``JobConfig``; unknown keys are errors, so a typo
fails fast with the field's name instead of silently using a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, with the offending field named in the message."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputConfig(_Strict):
    path: str = Field(description="Parquet file or directory: local path or URI (s3://bucket/prefix).")
    create_sample_rows: int | None = Field(
        None, ge=1, le=100_000,
        description="Demo only: when `path` is a missing local directory, write the synthetic sample corpus "
        "of this many rows there first. Leave unset for real data.",
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Images with more pixels become error rows (decompression-bomb guard)."
    )


class OutputConfig(_Strict):
    path: str = Field(description="Output directory of Parquet files: local path or URI.")
    max_rows_per_file: int | None = Field(10_000, ge=1, description="Upper bound on rows per output file.")
    mode: Literal["error", "overwrite"] = Field(
        "error", description="When the output directory already holds files: fail (never mixes runs) or replace them."
    )


class ModelConfig(_Strict):
    path: str = Field(
        description="Anything from_pretrained accepts (hub id or local directory), or `tiny:llava` for the "
        "offline tiny checkpoint (built once into $RESPRUNE_CACHE or ~/.cache/resprune-pipeline)."
    )
    family: Literal["auto", "llava"] = Field("auto", description="Adapter; `auto` reads the checkpoint's model_type.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="`auto`: bfloat16 on CUDA, float32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: cuda when available, else cpu.")
    architecture: str | None = Field(
        None, description="Directory holding the checkpoint's config.json, read instead of `path`'s by the cost "
        "planner when `path` cannot be reached (e.g. configs/checkpoints/llava-1.5-7b-hf offline). The job itself "
        "always counts from the checkpoint it loads.",
    )


class PruningConfig(_Strict):
    method: str = Field("resprune", description="One of pipeline.pruning.METHODS: none, random, score_topk, divprune, resprune.")
    keep: int = Field(128, ge=1, description="Visual tokens kept per image (all of them when >= the image's count).")
    alpha: float = Field(0.75, ge=0.0, le=10.0, description="ResPrune text-guidance strength (0 = no guidance).")
    rng_seed: int = Field(0, description="Seed of the `random` method.")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from pipeline.pruning import METHODS

        if v not in METHODS:
            raise ValueError(f"unknown pruning method {v!r}; known: {', '.join(sorted(METHODS))}")
        return v


class GenerationConfig(_Strict):
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Upper bound on generated tokens per row.")
    do_sample: bool = Field(False, description="False: greedy decoding (reproducible).")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="Sampling temperature (do_sample only).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (do_sample only).")
    seed: int = Field(0, description="Torch seed set before each sampled batch.")


class StageConfig(_Strict):
    """Resources of one Ray Data stage: an actor pool of `pool_size` actors (autoscaling up to
    `max_pool_size` when set), each reserving `num_cpus` / `num_gpus`."""

    num_cpus: float = Field(1.0, gt=0.0, description="CPUs reserved per actor (fractions allowed).")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs reserved per actor; 0 runs the model on CPU.")
    pool_size: int = Field(1, ge=1, description="Actors started up front.")
    max_pool_size: int | None = Field(None, ge=1, description="Autoscale up to this many actors (None: fixed).")
    batch_size: int = Field(8, ge=1, le=4096, description="Rows per call.")

    @model_validator(mode="after")
    def _pool_bounds(self) -> StageConfig:
        if self.max_pool_size is not None and self.max_pool_size < self.pool_size:
            raise ValueError(f"max_pool_size ({self.max_pool_size}) must be >= pool_size ({self.pool_size})")
        return self


class TextStageConfig(StageConfig):
    spacy_model: str = Field("en_core_web_sm", description="spaCy package or pipeline dir; fallback if missing.")


class CostConfig(_Strict):
    accelerator: str | None = Field(
        None, description="GPU type the GPU stages run on: a key of the price table's `accelerators`. Required when "
        "a stage reserves GPUs; unused on CPU-only runs.",
    )
    prices: str = Field(
        "configs/prices.yaml", description="Price table (YAML, every figure with source and date). A relative path is "
        "looked up in the working directory, then in the repository root.",
    )


class RayConfig(_Strict):
    address: str | None = Field(
        None, description="Cluster to join; None: RAY_ADDRESS or a job's cluster if set, else start a local one."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started Ray (None: all).")
    io_num_cpus: float = Field(0.25, gt=0.0, description="CPUs per read/write task.")
    check_resources: bool = Field(
        True, description="Fail fast when the stages ask for more CPUs/GPUs than the cluster has "
        "(a pipeline that cannot schedule hangs instead of failing). Disable on autoscaling clusters.",
    )


class JobConfig(_Strict):
    input: InputConfig
    output: OutputConfig
    model: ModelConfig
    pruning: PruningConfig = PruningConfig()
    generation: GenerationConfig = GenerationConfig()
    text_stage: TextStageConfig = TextStageConfig(num_cpus=0.25, batch_size=64, max_pool_size=2)
    encode_stage: StageConfig = StageConfig(num_cpus=0.5)
    decode_stage: StageConfig = StageConfig(num_cpus=0.5)
    cost: CostConfig = CostConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _accelerator_named(self) -> JobConfig:
        gpu_stages = [n for n in ("encode_stage", "decode_stage", "text_stage") if getattr(self, n).num_gpus > 0]
        if gpu_stages and not self.cost.accelerator:
            raise ValueError(
                f"cost.accelerator: required when a stage reserves GPUs ({', '.join(gpu_stages)}): name the GPU type "
                "as it appears in the price table (cost.prices), e.g. h100-sxm"
            )
        return self

    def stages(self) -> dict[str, StageConfig]:
        """The actor-pool stages by config field name, in pipeline order."""
        return {"text_stage": self.text_stage, "encode_stage": self.encode_stage, "decode_stage": self.decode_stage}


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Read YAML, apply dotted-key overrides (``{"pruning.keep": 64}``), validate."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "config") -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid {source}: {problems}") from None
