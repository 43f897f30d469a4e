"""Job configuration: one validated schema, documented here and nowhere else.

A YAML file (see ``configs/``) maps onto ``JobConfig``; unknown keys are errors, so a typo
fails fast with the field's name instead of silently using a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipeline.engines import registry as engine_registry  # light: no torch, vLLM or Ray


class ConfigError(ValueError):
    """A configuration problem, with the offending field named in the message."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class InputConfig(_Strict):
    path: str | list[str] = Field(
        description="Where the corpus is: a local path or URI (s3://bucket/prefix). `format: parquet`: a Parquet file "
        "or directory; `files`: a prefix (or a list of prefixes) of image files; `webdataset`: a directory of tar "
        "shards. docs/inputs.md."
    )
    format: Literal["parquet", "files", "webdataset"] = Field(
        "parquet", description="`parquet`: rows with `id`, the image (bytes in `image`, or a reference in "
        "`image_column`) and `prompt`; `files`: every image file under `path` (id: its key relative to the prefix, "
        "without the extension); `webdataset`: tar shards (id: the sample's key; the image is the member with an image "
        "extension, `.txt` / `.json` members become columns `txt` / `json`).",
    )
    extensions: tuple[str, ...] = Field(
        IMAGE_EXTENSIONS, min_length=1, description="`files` and `webdataset`: the file (member) name extensions that "
        "are images, matched without case.",
    )
    prompt: str | None = Field(
        None, min_length=1, description="Every row's prompt, for inputs without a `prompt` column (image files, shards "
        "without one). Not with an input that has one, nor with a task spec (its prompts are the tasks').",
    )
    image_column: str | None = Field(
        None, min_length=1, description="`parquet` only: the column holding each row's image as a reference (an "
        "s3:// URI or a local path, absolute or relative to `image_root`), fetched by the job, instead of bytes in "
        "`image`.",
    )
    image_root: str | None = Field(
        None, min_length=1, description="With `image_column`: the prefix (local path or URI) that relative references "
        "are read under. None: references must be URIs or absolute paths.",
    )
    max_image_bytes: int = Field(
        64 * 2**20, ge=1, description="Images read by reference or as files larger than this become error rows "
        "(`image too large`) without being read past the limit.",
    )
    fetch_concurrency: int = Field(
        16, ge=1, le=256, description="Images read by reference (files, image_column) per fetch task, all in flight "
        "at once: object-store latency, not CPU, bounds a fetch.",
    )
    create_sample_rows: int | None = Field(
        None, ge=1, le=100_000,
        description="demo only: jobs/submit_local.sh draws the sample corpus here first",
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Images with more pixels become error rows (`image too large`), decided from "
        "the header before any pixel is decoded (decompression-bomb guard).",
    )
    min_image_side: int = Field(
        8, ge=1, description="Images with a side shorter than this many pixels become error rows (`image too small`).",
    )
    id_policy: Literal["fail", "drop_duplicates"] = Field(
        "fail", description="Null, empty or repeated ids, found before any model work: `fail` stops the job naming a "
        "few of them and the count; `drop_duplicates` drops rows without an id and keeps only the first row of each "
        "repeated id (files in path order, rows in file order), counted in the manifest.",
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Most tokens a prompt may take after the chat template (image placeholders not "
        "counted). None: what the model can take, its context length less the row's kept visual tokens and "
        "generation.max_new_tokens.",
    )
    long_prompt: Literal["reject", "truncate"] = Field(
        "reject", description="A prompt over the limit: `reject` (an error row, `prompt too long`) or `truncate` (keep "
        "its first tokens, answer, and set the row's `prompt_truncated`).",
    )
    jpeg_draft_margin: float | None = Field(
        2.0, ge=1.0, le=16.0, description="Fast JPEG decoding: a JPEG at least twice this many times the size the "
        "model's processor resizes it to is decoded at a reduced DCT scale (1/2, 1/4 or 1/8: PIL's draft mode), never "
        "below this many times that size, so the processor's own resize still starts from that much more detail "
        "(PIL's thumbnail uses 2). null: decode every pixel. docs/preparation.md shows what it changes.",
    )

    @field_validator("extensions")
    @classmethod
    def _extensions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(e.lower().lstrip(".") for e in v))

    @model_validator(mode="after")
    def _format_fields(self) -> InputConfig:
        if isinstance(self.path, list) and (self.format != "files" or not self.path):
            raise ValueError("path: a list of prefixes is read with format: files only (and needs one at least)")
        if self.image_column and self.format != "parquet":
            raise ValueError(f"image_column: references are read with format: parquet only, not {self.format}")
        if self.image_root and not self.image_column:
            raise ValueError("image_root: it is where image_column's relative references are read; set image_column")
        return self

    @property
    def paths(self) -> list[str]:
        """``path`` as a list (one entry unless ``format: files`` names several prefixes)."""
        return list(self.path) if isinstance(self.path, list) else [self.path]


class OutputConfig(_Strict):
    path: str = Field(description="Output directory of Parquet files: local path or URI.")
    max_rows_per_file: int | None = Field(10_000, ge=1, description="Upper bound on rows per output file.")
    mode: Literal["error", "overwrite", "resume"] = Field(
        "error", description="When the output directory already holds files: `error` fails (never mixes runs), "
        "`overwrite` deletes them first, `resume` keeps the rows an earlier attempt of the same run committed and "
        "writes only the rest (every input row exactly once; a missing output starts fresh).",
    )
    incremental: bool = Field(
        False, description="Scheduled runs over a growing corpus: `path` is a root of runs. Each run writes to "
        "`<path>/run-<UTC time>/` the input shards (files) that no earlier run under the root took, and records them "
        "in its manifest; a run that did not complete is resumed first (its own shards, `mode: resume`), so a retry "
        "never takes new shards or redoes old ones. No new shard: nothing runs (exit 0). `mode` must not be "
        "`overwrite`.",
    )

    @model_validator(mode="after")
    def _incremental_mode(self) -> OutputConfig:
        if self.incremental and self.mode == "overwrite":
            raise ValueError("mode overwrite with incremental: incremental runs never delete earlier runs (use mode error or resume)")
        return self


class ModelConfig(_Strict):
    path: str = Field(
        description="Anything from_pretrained accepts (hub id or local directory), or `tiny:<recipe>` for an "
        "offline tiny checkpoint (one per family, e.g. tiny:llava, tiny:qwen3_vl: built once into $RESPRUNE_CACHE or "
        "~/.cache/resprune-pipeline; tiny:llava-shapes: trained, committed; the list: docs/tiny-models.md)."
    )
    family: str = Field(
        "auto", description="Adapter (a name in pipeline.models.ADAPTERS, e.g. llava, qwen3_vl; docs/families.md); "
        "`auto` reads the checkpoint's model_type."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="`auto`: bfloat16 on CUDA, float32 on CPU."
    )

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        from pipeline.models import ADAPTERS  # the families are their adapters: no second list here

        if v != "auto" and v not in ADAPTERS:
            names = " or ".join(", ".join(repr(n) for n in ("auto", *ADAPTERS)).rsplit(", ", 1))
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": names})
        return v
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: cuda when available, else cpu.")
    min_pixels: int | None = Field(
        None, ge=28 * 28, description="Qwen2.5-VL / Qwen3-VL dynamic resolution: images are resized to at least this many "
        "pixels (None: the checkpoint's processor setting). Other families ignore it.",
    )
    max_pixels: int | None = Field(
        None, ge=28 * 28, description="Qwen2.5-VL / Qwen3-VL dynamic resolution: images are resized to at most this many "
        "pixels, which bounds the visual tokens per image to max_pixels / 784 (Qwen2.5-VL) or / 1024 (Qwen3-VL) "
        "(None: the processor's setting).",
    )
    architecture: str | None = Field(
        None, description="Directory holding the checkpoint's config.json, read instead of `path`'s by the cost "
        "planner when `path` cannot be reached (e.g. configs/checkpoints/llava-1.5-7b-hf offline). The job itself "
        "always counts from the checkpoint it loads.",
    )

    @model_validator(mode="after")
    def _pixel_bounds(self) -> ModelConfig:
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must be <= max_pixels ({self.max_pixels})")
        return self


DEFAULT_KEEP = 128
DEFAULT_MIN_KEEP = 16


class PruningConfig(_Strict):
    """The budget is a count (`keep`) or a ratio (`prune_ratio`), never both; neither set means
    keep = 128. Each row's applied budget is written to the output's `keep` column. With `energy`
    (ResPrune only) that budget is the cap of an adaptive one: each image keeps the fewest of its
    greedy picks, at least `min_keep`, that explain `energy` of its token energy
    (pipeline/pruning/energy.py); `visual_tokens_kept` and `energy_explained` say where it stopped."""

    method: str = Field("resprune", description="One of pipeline.pruning.METHODS: none, random, score_topk, divprune, resprune.")
    keep: int | None = Field(
        None, ge=1, description="Budget as a count: keep up to this many visual tokens per image (all of them when the "
        "image has fewer). 128 when neither keep nor prune_ratio is set.",
    )
    prune_ratio: float | None = Field(
        None, ge=0.0, lt=1.0, description="Budget as a ratio: prune this fraction of each image's visual tokens, e.g. "
        "0.778 keeps ceil(22.2 %) of them (at least 1). Suits families whose token count follows the image size.",
    )
    alpha: float | None = Field(
        None, ge=0.0, le=10.0, description="ResPrune text-guidance strength (0 = no guidance). None: the paper's "
        "setting for the model family (LLaVA-1.5 and LLaVA-NeXT 0.75, Qwen2.5-VL 0.3).",
    )
    rng_seed: int = Field(0, description="Seed of the `random` method.")
    energy: float | None = Field(
        None, gt=0.0, lt=1.0, description="Adaptive budget (method resprune): keep the fewest greedy picks whose "
        "span explains this fraction of the image's token energy, between min_keep and the budget (keep or "
        "prune_ratio, the cap). None: a fixed budget.",
    )
    min_keep: int = Field(
        DEFAULT_MIN_KEEP, ge=1, description="Adaptive budget: keep at least this many tokens (capped at the budget).",
    )
    energy_weighting: Literal["plain", "gated"] = Field(
        "plain", description="Adaptive budget: token energy as is (plain) or weighted by ResPrune's text gate "
        "(gated); see pipeline/pruning/energy.py.",
    )

    @model_validator(mode="before")
    @classmethod
    def _one_budget(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("keep") is not None and data.get("prune_ratio") is not None:
                raise ValueError("keep and prune_ratio both set: give the budget as a count or as a ratio, not both")
            if data.get("keep") is None and data.get("prune_ratio") is None:
                data = {**data, "keep": DEFAULT_KEEP}
        return data

    @model_validator(mode="after")
    def _energy_needs_a_trace(self) -> PruningConfig:
        from pipeline.pruning import ENERGY_TRACED

        if self.energy is not None and self.method not in ENERGY_TRACED:
            raise ValueError(
                f"energy is set but method {self.method!r} has no energy trace (only {', '.join(sorted(ENERGY_TRACED))} "
                "does): other methods keep a fixed budget, drop energy for them")
        if self.energy is not None and self.keep is not None and self.min_keep > self.keep:
            raise ValueError(f"min_keep ({self.min_keep}) is above the cap keep ({self.keep})")
        return self

    def keep_for(self, visual_tokens: int) -> int:
        """The budget applied to an image of ``visual_tokens`` tokens (the one budget rule)."""
        from pipeline.pruning import budget

        return budget(visual_tokens, keep=self.keep, prune_ratio=self.prune_ratio)

    def alpha_for(self, family_default: float) -> float:
        """The text-guidance strength applied: ``alpha`` when set, else the family's default."""
        return self.alpha if self.alpha is not None else family_default

    def describe(self) -> str:
        """The budget as configured: "keep 128", "prune 77.8 %" or "energy 0.9, 16 to keep 128"."""
        fixed = f"keep {self.keep}" if self.keep is not None else f"prune {100 * self.prune_ratio:g} %"
        if self.energy is None:
            return fixed
        gated = ", gated" if self.energy_weighting == "gated" else ""
        return f"energy {self.energy:g}{gated}, {self.min_keep} to {fixed}"

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


TASK_TYPES = ("text", "choice", "json")


class TaskConfig(_Strict):
    """One annotation task: what a run asks of every image (docs/tasks.md). Its answer goes to
    the output column named after it; `choice` and `json` answers are constrained while they are
    generated (both engines), so they always parse unless generation stops first."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(
        pattern=r"^[a-z][a-z0-9_]{0,39}$", description="The task's output column (and prefix of its other columns): "
        "lower case, digits and underscores, starting with a letter, at most 40 characters; unique in the run.",
    )
    prompt: str = Field(
        min_length=1, description="The question, a fixed text or a template over the row's columns: `{column}` is "
        "replaced by the row's value (`{{` and `}}` for literal braces). A row whose column is null or empty gets "
        "that task's `missing prompt` error.",
    )
    type: Literal["text", "choice", "json"] = Field(
        "text", description="`text`: free text; `choice`: exactly one of `choices`; `json`: a JSON value that "
        "validates against `schema`.",
    )
    choices: list[str] | None = Field(
        None, validate_default=True, description="type choice only: the labels, at least one, each non-empty and unique.",
    )
    json_schema: dict[str, Any] | None = Field(
        None, alias="schema", validate_default=True, description="type json only: a JSON Schema (draft 2020-12 unless it names another); "
        "an object with `properties` is written as an Arrow struct, a list as a list (docs/tasks.md).",
    )
    max_new_tokens: int | None = Field(
        None, ge=1, le=4096, description="Upper bound on this task's generated tokens (None: generation.max_new_tokens). "
        "A `json` answer cut off by it is the task's error (`invalid answer`).",
    )

    @field_validator("prompt")
    @classmethod
    def _template(cls, v: str) -> str:
        from pipeline.tasks import template_columns

        template_columns(v)  # raises ValueError naming what is wrong
        if not v.strip():
            raise ValueError("empty prompt")
        return v

    @field_validator("choices")
    @classmethod
    def _choices(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        kind = info.data.get("type")
        if kind != "choice":
            if v is not None:
                raise ValueError(f"choices is for type choice only (this task is type {kind})")
            return v
        if not v:
            raise ValueError("type choice needs a non-empty list of choices")
        if any(not c.strip() for c in v):
            raise ValueError("a label is empty")
        repeated = sorted({c for c in v if v.count(c) > 1})
        if repeated:
            raise ValueError(f"{', '.join(map(repr, repeated))} given more than once")
        return v

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, v: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        kind = info.data.get("type")
        if kind != "json":
            if v is not None:
                raise ValueError(f"schema is for type json only (this task is type {kind})")
            return v
        if v is None:
            raise ValueError("type json needs a schema (a JSON Schema)")
        from pipeline.tasks import check_json_schema

        check_json_schema(v)  # raises ValueError saying why
        return v


class StageConfig(_Strict):
    """Resources of one Ray Data stage: an actor pool of `pool_size` actors (autoscaling up to
    `max_pool_size` when set), each reserving `num_cpus` / `num_gpus`."""

    num_cpus: float = Field(1.0, gt=0.0, description="CPUs reserved per actor (fractions allowed).")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs reserved per actor; 0 runs the model on CPU.")
    pool_size: int = Field(1, ge=1, description="Actors started up front.")
    max_pool_size: int | None = Field(None, ge=1, description="Autoscale up to this many actors (None: fixed).")
    batch_size: int = Field(8, ge=1, le=4096, description="Rows per call.")
    concurrent_batches: int | None = Field(
        None, ge=1, le=8, description="Batches an actor holds at once (Ray Data's max_concurrent_calls_per_actor): with "
        "2, Ray fetches and converts the next batch and builds the last one's output on other threads while the "
        "stage's model runs one batch at a time (the call itself never runs twice at once). None: 2 for a stage that "
        "reserves a GPU (its host-side work then overlaps the GPU's), 1 otherwise.",
    )

    @property
    def calls_per_actor(self) -> int:
        """``concurrent_batches`` resolved."""
        return self.concurrent_batches or (2 if self.num_gpus > 0 else 1)

    @model_validator(mode="after")
    def _pool_bounds(self) -> StageConfig:
        if self.max_pool_size is not None and self.max_pool_size < self.pool_size:
            raise ValueError(f"max_pool_size ({self.max_pool_size}) must be >= pool_size ({self.pool_size})")
        return self


class PrepareStageConfig(StageConfig):
    """The CPU preparation stage (decode the image, the processor's resize): CPU only. An actor
    prepares one image at a time on one thread, so give each 1 CPU and size the pool by actors:
    the planner's CPU columns and the job's warning say how many keep the GPU pools fed
    (docs/cost-and-planner.md, "The CPU side")."""

    num_gpus: float = Field(0.0, ge=0.0, le=0.0, description="Always 0: preparation is CPU work.")


class VLLMConfig(_Strict):
    """The vLLM engine (``decode_stage.engine: vllm``): one ``vllm.LLM`` per decode actor, for the
    actor's life, fed only the kept visual tokens as embeddings (the vision tower is never loaded)."""

    python: str | None = Field(
        None, description="Interpreter of the environment vLLM is installed in; the decode actors run in it "
        "(Ray runtime_env py_executable), the rest of the job in the driver's. It must hold this package and the "
        "driver's Ray version. None: RESPRUNE_VLLM_PYTHON if set, else `.venv-vllm/bin/python` in the repository "
        "when present (`make test` builds it), else the driver's own interpreter.",
    )
    max_num_seqs: int = Field(64, ge=1, le=4096, description="Most sequences the engine runs at once.")
    max_model_len: int | None = Field(
        None, ge=16, description="Most tokens per sequence (prompt, kept visual tokens, new tokens); None: the "
        "model's context length. Smaller leaves more KV cache per sequence.",
    )
    gpu_memory_utilization: float = Field(
        0.85, gt=0.0, le=1.0, description="Share of the GPU's memory the engine may take for weights, activations "
        "and KV cache (GPU actors). With encode and decode actors on one GPU, leave the encoder its share.",
    )
    cpu_kv_cache_gib: int = Field(
        1, ge=1, le=1024, description="KV cache on CPU actors (num_gpus: 0), in GiB (VLLM_CPU_KVCACHE_SPACE).",
    )
    enforce_eager: bool | None = Field(
        None, description="Skip graph capture and compilation. None: eager on CPU (compiling takes minutes there), "
        "CUDA graphs on GPUs.",
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of shared prompt prefixes (the chat template's). Benchmarks turn it "
        "off: a repeated corpus would reuse whole earlier prefills.",
    )


class DecodeStageConfig(StageConfig):
    engine: str = Field("hf", description=engine_registry.described())
    vllm: VLLMConfig = Field(VLLMConfig(), description="The vLLM engine's settings (engine: vllm only).")
    max_batch_tokens: int = Field(
        32_768, ge=1, description="Bound on one generate call: rows x (longest prompt + max_new_tokens) tokens. A "
        "batch over it is split into calls of rows of similar length, so one long prompt cannot pad the whole batch "
        "to its length. A row over it alone still runs (its length is bounded by input.max_prompt_tokens). engine: hf "
        "only: vLLM schedules each Ray batch itself.",
    )
    call_timeout_s: float | None = Field(
        None, gt=0.0, le=86_400.0, description="Bound on one engine call, in seconds: a call still running then counts "
        "as a stuck engine (the actor restarts with a fresh engine and the batch runs again). None: 120 s plus, per "
        "token of prefill and generation of the call's rows, 0.005 s on a GPU or 0.25 s on a CPU (docs/reliability.md).",
    )
    start_timeout_s: float = Field(
        1800.0, gt=0.0, le=86_400.0, description="Bound on an engine's start (loading the model, compiling, "
        "allocating its cache), in seconds: a start still running then counts as a stuck engine. A start that fails "
        "once an engine of the run has started is an engine failure too; the first start's error stops the run.",
    )
    max_engine_restarts: int = Field(
        10, ge=0, le=10_000, description="Engine failures (a dead or stuck engine, each answered by a fresh engine and "
        "the batch run again) the run tolerates; one more stops it with exit 3 (--resume finishes it).",
    )


    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        names = engine_registry.engine_names()  # read now: an engine registered after import counts
        if v not in names:
            # Worded as pydantic words a Literal's error, naming every registered engine.
            quoted = [repr(n) for n in names]
            expected = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
        return v


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


class StorageConfig(_Strict):
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint for s3:// paths (MinIO, Ceph, ...). None: AWS_ENDPOINT_URL_S3 or "
        "AWS_ENDPOINT_URL if set, else AWS. Credentials always come from the standard AWS chain, never from here.",
    )
    retry_attempts: int = Field(
        8, ge=1, le=50, description="Attempts per storage call the driver makes (listing, footers, ids, manifest) on a "
        "transient error, with exponential backoff; Ray Data's own reads and writes retry as Ray configures them.",
    )
    retry_max_backoff_s: float = Field(8.0, gt=0.0, le=300.0, description="Longest wait between two attempts.")


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
    max_task_retries: int = Field(
        3, ge=0, le=100, description="Times a stage's batch is retried after its actor died (a lost node, a crash): "
        "dead actors are restarted, and a batch that kills its actor on every try stops the run (exit 3) instead of "
        "looping forever (Ray Data's default).",
    )


class JobConfig(_Strict):
    input: InputConfig
    output: OutputConfig
    model: ModelConfig
    pruning: PruningConfig = PruningConfig()
    generation: GenerationConfig = GenerationConfig()
    text_stage: TextStageConfig = TextStageConfig(num_cpus=0.25, batch_size=64, max_pool_size=2)
    prepare_stage: PrepareStageConfig = PrepareStageConfig(num_cpus=0.25, batch_size=8, max_pool_size=2)
    encode_stage: StageConfig = StageConfig(num_cpus=0.5)
    decode_stage: DecodeStageConfig = DecodeStageConfig(num_cpus=0.5)
    cost: CostConfig = CostConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    tasks: list[TaskConfig] | None = Field(
        None, description="The annotation tasks asked of every image, each with its own output columns "
        "(docs/tasks.md), or the path of a YAML file holding that list (read when the config is loaded; relative "
        "to the working directory, else to the config's directory). None: one free-text task from each row's "
        "`prompt` column, written as today's `answer` columns.",
    )

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, v: list[TaskConfig] | None) -> list[TaskConfig] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("an empty task list: give at least one task, or leave tasks out")
        from pipeline.tasks import reserved_column

        names = [t.name for t in v]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"task names must be unique: {', '.join(map(repr, repeated))} repeated")
        for t in v:
            clash = reserved_column(t.name, names)
            if clash:
                raise ValueError(f"task name {t.name!r}: {clash}")
        return v

    @model_validator(mode="after")
    def _accelerator_named(self) -> JobConfig:
        gpu_stages = [n for n, s in self.stages().items() if s.num_gpus > 0]
        if gpu_stages and not self.cost.accelerator:
            raise ValueError(
                f"cost.accelerator: required when a stage reserves GPUs ({', '.join(gpu_stages)}): name the GPU type "
                "as it appears in the price table (cost.prices), e.g. h100-sxm"
            )
        return self

    @model_validator(mode="after")
    def _one_prompt_source(self) -> JobConfig:
        if self.input.prompt and self.tasks:
            raise ValueError("input.prompt: a task spec gives every row its prompts (its tasks'); leave one of them out")
        return self

    def stages(self) -> dict[str, StageConfig]:
        """The actor-pool stages by config field name, in pipeline order."""
        return {"text_stage": self.text_stage, "prepare_stage": self.prepare_stage, "encode_stage": self.encode_stage,
                "decode_stage": self.decode_stage}


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Read YAML, apply dotted-key overrides (``{"pruning.keep": 64}``), validate."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    overrides = dict(overrides or {})
    for field, other in (("pruning.keep", "pruning.prune_ratio"), ("pruning.prune_ratio", "pruning.keep")):
        if overrides.get(field) is not None:  # a budget given on the command line replaces the file's
            overrides.setdefault(other, None)
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    if isinstance(raw.get("tasks"), str):
        raw["tasks"] = read_task_file(raw["tasks"], Path(path).parent)
    return validate_config(raw, source=str(path))


def read_task_file(name: str, config_dir: Path) -> Any:
    """The task list a config names by path: relative to the working directory, else to the
    config's directory."""
    candidates = [Path(name)] if Path(name).is_absolute() else [Path(name), config_dir / name]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ConfigError(f"tasks: task file {name!r} not found (looked in {', '.join(str(c) for c in candidates)})")
    try:
        tasks = yaml.safe_load(found.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"tasks: cannot read task file {found}: {e}") from e
    if isinstance(tasks, dict) and set(tasks) == {"tasks"}:
        tasks = tasks["tasks"]  # a file may hold the list under `tasks:` too
    if not isinstance(tasks, list):
        raise ConfigError(f"tasks: task file {found} must hold a list of tasks")
    return tasks


def validate_config(raw: dict[str, Any], source: str = "config") -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join('schema' if p == 'json_schema' else str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in e.errors()
        )
        raise ConfigError(f"invalid {source}: {problems}") from None
