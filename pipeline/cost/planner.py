"""Cost-per-image planning: measured figures from finished runs, estimates from a checkpoint's
shapes and an accelerator table, and a corpus plan (wall time, total cost, saving vs keep-all).

Estimate model (labelled ``estimated=True`` everywhere it appears), per image on one GPU:
    vision  = flops_vision  / (bf16_flops x vision_mfu)             compute-bound
    prefill = flops_prefill / (bf16_flops x prefill_mfu)            compute-bound
    decode  = S steps paid per image; a step of the decode batch reads the LLM weights once plus
              each row's KV cache: max(bytes / (bandwidth x decode_bandwidth),
              flops / (bf16_flops x prefill_mfu)) / decode_batch per image
GPU-seconds per image = vision + prefill + decode (one GPU does all of an image's work; the
encode and decode actors share it). CPU-only stages (the text stage, ~0.05 ms/row measured) and
ResPrune's selection (an N x N Gram GEMM, <1 % of the vision FLOPs) are left out.

The steps an image pays for depend on the decode engine the estimate assumes (``engine``, a
column of every row), by how its registry entry batches (``EngineSpec.schedules_batches``):
    vllm  continuous batching: a finished row's slot goes to the next row at once, so the batch
          stays full and an image pays for its own steps, S = generated - 1.
    hf    Hugging Face ``generate`` in static batches: a batch decodes until its longest row
          stops, taken as the cap (generation.max_new_tokens), and finished rows keep their slot
          (and their growing KV cache) until then, so S = max_new_tokens - 1 for every image.
          Prompt padding is left out: the decode stage groups rows of similar length.
FLOPs and KV cache per image are the useful work in both (what the job's rows count).

Generated tokens per image (``generated``, the decode term's input; column ``generated_tokens``,
its origin in ``generated_tokens_from``): given on the command line (``--generated-tokens``),
else the mean over the answered rows of the ``--runs`` given (their output's ``generated_tokens``
column), else the accelerator table's assumption (``assumptions.generated_tokens``). A caption
corpus generates ~5-10x the tokens of a VQA one, which moves an image's cost from prefill
(which pruning shrinks ~3x) to decode steps (which stream the weights whatever the prompt
length, so pruning shrinks them only through the KV cache): the plan has to know which corpus
it is planning.

Several tasks per image (``TaskLoad``, ``task_loads``): an image asked T questions (a task spec,
docs/tasks.md) pays the vision term once and each task's prefill (the kept visual tokens + the
table's ``text_tokens`` for the task's prompt) and decode steps (its own generated tokens: the
task's ``max_new_tokens``, else the estimates' generated tokens above; hf pays up to the task's
cap, else generation.max_new_tokens), summed per image: what the job does, encoding once. The
same questions as one row each encode the image T times: the ``*_per_row_questions`` columns add
(T - 1) x the vision term, and ``encode_once_saving`` / ``encode_once_flops_saving`` say what
encoding once saves. Without a task spec an image has one task of the estimates' generated tokens
(T = 1): the same formulas, the per-row columns equal to the encode-once ones, saving 0.

The CPU side (``add_cpu_side``, ``pipeline.cost.cpu_side``): the preparation stage's CPU ms per
image of the planned size, from the measured table (``configs/cpu_prepare.yaml``), turned into
the cores that keep one GPU fed at each row's images/s per GPU (prepare_ms x images/s / 1000),
the images/s per GPU the config's preparation pool allows (its cores at full size, each actor
min(num_cpus, 1), over the GPUs of the GPU pools at full size: cores x 1000 / prepare_ms), and a
CPU-bound flag when that is below the GPU's rate.

Measured rows come from a run's ``_manifest.json``: GPU-seconds and dollars per image are the
means of the per-row columns; a stage's images/s is answered rows / that stage's busy time; the
engine is the one the run's decode stage used (``engine.name``; older manifests: the config's
``decode_stage.engine``, ``hf`` when absent).
Wall time on G GPUs assumes G / (GPUs a run replica reserves) replicas scale linearly; for a
CPU-only run, G counts replicas of the run's whole resource set.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.engines.registry import engine_spec
from pipeline.io.manifest import read_manifest
from pipeline.io.storage import locate

from .flops import ModelShapes, decode_flops, kv_cache_bytes, prefill_flops, state_bytes, vision_flops
from .prices import Accelerator, Price, Utilisation

if TYPE_CHECKING:
    from pipeline.config import TaskConfig


@dataclass
class PlanRow:
    model: str
    method: str
    keep: int
    estimated: bool
    source: str  # "estimate" or the run directory
    accelerator: str
    engine: str  # decode engine: what a measured run used, what an estimate assumes ("vllm" / "hf")
    generated_tokens: float  # per image: the run's mean (measured), the decode term's input (estimate)
    generated_tokens_from: str  # GENERATED_FROM: where an estimate's figure came from; "this run" when measured
    flops_vision_per_image: float
    flops_prefill_per_image: float
    flops_decode_per_image: float
    flops_per_image: float
    kv_cache_bytes_per_image: float
    gpu_seconds_per_image: float | None
    decode_share: float | None  # share of gpu_seconds_per_image in decode steps (estimates; null when measured)
    images_per_second_per_gpu: float | None
    vision_images_per_second: float | None  # encode stage, one actor (measured) / one GPU (estimate)
    llm_images_per_second: float | None  # decode stage, likewise
    usd_per_1k_images: float
    wall_hours: float
    total_usd: float
    saving_vs_keep_all: float | None = None
    # Visual tokens kept per image: keep is the mean; p50 / p90 of the per-image counts where they
    # vary (adaptive budgets), and where the counts came from (KEPT_FROM, or the run's distribution).
    kept_p50: float | None = None
    kept_p90: float | None = None
    kept_from: str = "budget"
    # The CPU side (estimates; null on measured rows and where the CPU table lacks the family): the
    # preparation stage's CPU ms for the planned image size, the cores that keep one GPU fed at this
    # row's images/s per GPU, the images/s per GPU the config's preparation pool allows (its cores at
    # full size shared among the GPU pools' GPUs at full size; null for a config without GPU pools),
    # and whether that is below the GPU's rate (the plan is CPU-bound).
    prepare_ms_per_image: float | None = None
    cpu_cores_per_gpu: float | None = None
    cpu_images_per_second_per_gpu: float | None = None
    cpu_bound: bool | None = None
    # Several tasks per image (estimates; null on measured rows): the tasks each image is asked
    # (1 without a task spec), and the same questions asked as one row each, the image encoded once
    # per question: FLOPs, GPU-seconds and $ per 1k images, and what encoding once saves of them
    # (1 - encode once / one row per question; 0 at one task).
    tasks_per_image: int = 1
    flops_per_image_per_row_questions: float | None = None
    gpu_seconds_per_image_per_row_questions: float | None = None
    usd_per_1k_images_per_row_questions: float | None = None
    encode_once_flops_saving: float | None = None
    encode_once_saving: float | None = None  # of GPU-seconds, so of $
    # Hybrid decoders (Qwen3.5): each sequence's fixed linear-attention state (bytes; 0 for a dense
    # decoder), held for the sequence's life beside its KV cache whatever the length, and read and
    # written at every decode step: what pruning cannot shrink (estimates; null on measured rows).
    state_bytes_per_sequence: float | None = None


@dataclass(frozen=True)
class TaskLoad:
    """What one task asks of an image's LLM, for the estimate: its generated tokens, where that
    figure came from (TASK_FROM or one of GENERATED_FROM) and the cap a static batch (hf) runs to."""

    name: str
    generated_tokens: int
    generated_from: str
    max_new_tokens: int | None = None


CSV_COLUMNS = [f.name for f in fields(PlanRow)]
# Where an estimate's generated tokens per image came from, in the order they are preferred.
GENERATED_FROM = ("given", "measured from runs", "assumed")
DEFAULT_ENGINE = "vllm"  # what the cluster configs run (configs/llava-1.5-7b.yaml and siblings)
TASK_FROM = "task spec"  # a task's generated tokens taken from its max_new_tokens


def model_label(path: str) -> str:
    """How plans name a model: ``tiny:llava`` as configured, else the checkpoint's last path part."""
    return path if path.startswith("tiny:") else Path(path.rstrip("/")).name


def llm_weight_bytes(shapes: ModelShapes, bytes_per_element: int) -> int:
    """Weights a decode step streams: every layer's matrices and the LM head."""
    lang = shapes.language
    return (lang.token_flops // 2 + lang.hidden * lang.vocab) * bytes_per_element


def estimate(
    shapes: ModelShapes, *, model: str, method: str, keep: int, visual_tokens_in: int, encoder_patches: int,
    accelerator_name: str, accelerator: Accelerator, price: Price, assume: Utilisation, images: int, gpus: int,
    engine: str = DEFAULT_ENGINE, max_new_tokens: int | None = None, bytes_per_element: int = 2,
    generated_from: str = "assumed", tasks: Sequence[TaskLoad] | None = None,
) -> PlanRow:
    """One image of ``visual_tokens_in`` visual tokens (``encoder_patches`` through the vision
    encoder) with ``keep`` of them kept, encoded once and asked ``tasks`` (None: one task generating
    ``assume.generated_tokens`` tokens, where that figure came from: ``generated_from``, one of
    GENERATED_FROM), each task decoded by ``engine`` (see the module's docstring);
    ``max_new_tokens`` (generation.max_new_tokens) is the static batch's length for ``hf``."""
    if generated_from not in GENERATED_FROM:
        raise ValueError(f"generated_from {generated_from!r}: one of {', '.join(GENERATED_FROM)}")
    engine_spec(engine)  # an unknown engine is a ValueError naming the registered ones
    if tasks is None:  # no task spec: the one implicit task, T = 1 through the same arithmetic
        tasks = [TaskLoad("answer", assume.generated_tokens, generated_from, max_new_tokens)]
    if not tasks:
        raise ValueError("tasks: at least one task per image")
    for t in tasks:
        if t.generated_from not in (TASK_FROM, *GENERATED_FROM):
            raise ValueError(f"task {t.name}: generated_from {t.generated_from!r}: one of {TASK_FROM}, "
                             f"{', '.join(GENERATED_FROM)}")
    lang = shapes.language
    kept = min(keep, visual_tokens_in)
    seq = kept + assume.text_tokens  # every task's prompt: the kept tokens + the assumed text
    f_vision = vision_flops(shapes.vision, encoder_patches)
    t_vision = f_vision / (accelerator.bf16_flops * assume.vision_mfu)
    f_prefill = f_decode = kv_bytes = 0  # integer counts, as flops.py gives them
    t_prefill = t_decode = 0.0
    for task in tasks:
        gen = task.generated_tokens
        f_task_prefill = prefill_flops(lang, seq)
        f_prefill += f_task_prefill
        f_decode += decode_flops(lang, seq, gen)
        kv_bytes += kv_cache_bytes(lang, seq, gen, bytes_per_element)
        t_prefill += f_task_prefill / (accelerator.bf16_flops * assume.prefill_mfu)
        t_decode += decode_seconds(shapes, assume, accelerator, seq,
                                   paid_tokens(engine, gen, task.max_new_tokens), bytes_per_element)
    gpu_s = t_vision + t_prefill + t_decode
    usd_per_image = gpu_s * price.usd_per_hour / 3600
    n = len(tasks)
    flops = f_vision + f_prefill + f_decode
    # One row per question: the image prepared and encoded once per task, the LLM's work the same.
    flops_rows = flops + (n - 1) * f_vision
    gpu_s_rows = gpu_s + (n - 1) * t_vision
    return PlanRow(
        model=model, method=method, keep=kept, estimated=True, source="estimate", accelerator=accelerator_name,
        engine=engine, generated_tokens=sum(t.generated_tokens for t in tasks),
        generated_tokens_from=" + ".join(dict.fromkeys(t.generated_from for t in tasks)),
        flops_vision_per_image=f_vision, flops_prefill_per_image=f_prefill, flops_decode_per_image=f_decode,
        flops_per_image=flops, kv_cache_bytes_per_image=kv_bytes,
        gpu_seconds_per_image=gpu_s, decode_share=t_decode / gpu_s, images_per_second_per_gpu=1 / gpu_s,
        vision_images_per_second=1 / t_vision, llm_images_per_second=1 / (t_prefill + t_decode),
        usd_per_1k_images=1000 * usd_per_image,
        wall_hours=images * gpu_s / gpus / 3600, total_usd=images * usd_per_image,
        tasks_per_image=n, flops_per_image_per_row_questions=flops_rows,
        gpu_seconds_per_image_per_row_questions=gpu_s_rows,
        usd_per_1k_images_per_row_questions=1000 * gpu_s_rows * price.usd_per_hour / 3600,
        encode_once_flops_saving=1 - flops / flops_rows, encode_once_saving=1 - gpu_s / gpu_s_rows,
        state_bytes_per_sequence=state_bytes(lang, bytes_per_element),
    )


def decode_seconds(shapes: ModelShapes, assume: Utilisation, accelerator: Accelerator, seq: int, paid: int,
                   bytes_per_element: int = 2) -> float:
    """GPU-seconds of one task's decode steps per image: ``paid - 1`` steps after a ``seq``-token
    prompt, each step of ``assume.decode_batch`` rows reading the LLM weights once plus each row's
    KV cache (taken midway through decoding) and, in a hybrid decoder, reading and writing its
    fixed linear-attention state, or compute-bound where that is slower."""
    lang = shapes.language
    steps = max(0, paid - 1)
    if not steps:
        return 0.0
    mean_kv = kv_cache_bytes(lang, seq, 1 + steps // 2, bytes_per_element)  # cache midway through decoding
    per_row = mean_kv + 2 * state_bytes(lang, bytes_per_element)
    step_bytes = llm_weight_bytes(shapes, bytes_per_element) + assume.decode_batch * per_row
    step_flops = assume.decode_batch * decode_flops(lang, seq, paid) / steps
    t_step = max(step_bytes / (accelerator.memory_bandwidth * assume.decode_bandwidth),
                 step_flops / (accelerator.bf16_flops * assume.prefill_mfu))
    return steps * t_step / assume.decode_batch


def paid_tokens(engine: str, generated: int, max_new_tokens: int | None) -> int:
    """Tokens' worth of decode steps one image occupies a batch slot for: its own under
    continuous batching (vllm), the static batch's longest row under static batches (hf: the cap)."""
    if engine_spec(engine).schedules_batches:
        return generated
    return max(generated, max_new_tokens or generated)


def run_engine(manifest: dict) -> str:
    """The decode engine a run used: the manifest's ``engine.name``; older manifests, from before
    the engine was recorded, by their config (``decode_stage.engine``, else ``hf``, then the only one)."""
    name = (manifest.get("engine") or {}).get("name")
    return name or manifest["config"].get("decode_stage", {}).get("engine", "hf")


def parse_budgets(text: str) -> list[tuple[int | None, float | None]]:
    """``"576,128"`` (counts) and ``"66.7%,88.9%"`` (prune ratios) -> ``[(keep, prune_ratio)]``,
    one of the two set per budget, for ``pipeline.pruning.budget``; ``0%`` is keep-all."""
    out: list[tuple[int | None, float | None]] = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        try:
            if token.endswith("%"):
                ratio = float(token[:-1]) / 100
                if not 0 <= ratio < 1:
                    raise ValueError
                out.append((None, ratio))
            else:
                keep = int(token)
                if keep < 1:
                    raise ValueError
                out.append((keep, None))
        except ValueError:
            raise ValueError(f"--budgets: {token!r} is neither a count >= 1 nor a prune ratio in [0%, 100%)") from None
    if not out:
        raise ValueError("--budgets: no budget given")
    return out


def measured(run: str, *, images: int, gpus: int) -> PlanRow:
    """A plan row from a finished run's manifest (its output's row count checked against it)."""
    m = read_manifest(locate(run))
    if m is None or m.get("status", "completed") != "completed":
        raise ValueError(f"{run}: not a finished run ({'no manifest' if m is None else 'status ' + m['status']})")
    written = locate(run).parquet_dataset().count_rows()
    if written != m["rows"]["output"]:
        raise ValueError(f"{run}: manifest says {m['rows']['output']} rows, the output holds {written}")
    if not m["rows"]["ok"]:
        raise ValueError(f"{run}: no answered rows to measure")
    gen_mean, _ = run_generated_tokens(run)
    cfg, cost = m["config"], m["cost"]
    mean, stages = cost["mean_per_image"], cost["stages"]
    gpu_s = mean["gpu_seconds"] or None
    if gpu_s:
        wall_s = images * gpu_s / gpus
    else:  # CPU-only: a replica's throughput is its slowest pool's
        replica = min(s["pool_size"] * s["images_per_second"] for s in stages.values() if s["images_per_second"])
        wall_s = images / (gpus * replica)
    return PlanRow(
        model=model_label(m["model"]["configured_path"]), method=cfg["pruning"]["method"],
        keep=round(m["visual_tokens"]["mean_kept"]), estimated=False, source=run,
        accelerator=cost["accelerator"] or "cpu", engine=run_engine(m),
        generated_tokens=gen_mean, generated_tokens_from="this run",
        flops_vision_per_image=mean["flops_vision"], flops_prefill_per_image=mean["flops_prefill"],
        flops_decode_per_image=mean["flops_total"] - mean["flops_vision"] - mean["flops_prefill"],
        flops_per_image=mean["flops_total"], kv_cache_bytes_per_image=mean["kv_cache_bytes"],
        # The decode stage's time includes prefill, so a run does not say what decode steps alone took.
        gpu_seconds_per_image=gpu_s, decode_share=None, images_per_second_per_gpu=1 / gpu_s if gpu_s else None,
        vision_images_per_second=stages["encode_stage"]["images_per_second"],
        llm_images_per_second=stages["decode_stage"]["images_per_second"],
        usd_per_1k_images=1000 * mean["cost_usd"],
        wall_hours=wall_s / 3600, total_usd=images * mean["cost_usd"],
        kept_p50=(m["visual_tokens"].get("kept") or {}).get("p50"),
        kept_p90=(m["visual_tokens"].get("kept") or {}).get("p90"), kept_from="this run",
        state_bytes_per_sequence=cost.get("recurrent_state_bytes_per_sequence"),  # absent before hybrid decoders
    )


def run_kept_shares(run: str) -> list[float]:
    """Per answered row of a run's output: the share of its visual tokens it kept
    (``visual_tokens_kept / visual_tokens_in``), the distribution an adaptive budget produced."""
    ds = locate(run).parquet_dataset()
    t = ds.to_table(columns=["visual_tokens_kept", "visual_tokens_in", "error"]).to_pylist()
    shares = [r["visual_tokens_kept"] / r["visual_tokens_in"] for r in t if not r["error"] and r["visual_tokens_in"]]
    if not shares:
        raise ValueError(f"{run}: no answered rows to measure")
    return shares


def adaptive_budget(run: str) -> str | None:
    """How a finished run's budget was set when it was adaptive (pruning.energy), e.g. "energy
    0.999, 16 to keep 192"; None for a fixed budget."""
    from pipeline.config import PruningConfig

    m = read_manifest(locate(run))
    if m is None:
        raise ValueError(f"{run}: no manifest")
    pruning = PruningConfig.model_validate(m["config"]["pruning"])
    return pruning.describe() if pruning.energy is not None else None


def estimate_distribution(shares: list[float], *, visual_tokens_in: int, kept_from: str, **kwargs: object) -> PlanRow:
    """An estimate for a corpus whose images keep the given shares of their visual tokens (a
    measured run's distribution, ``run_kept_shares``): each image at its own count
    (``round(share x visual_tokens_in)``, at least 1), averaged per image over the distribution,
    not the estimate at the mean count (prefill attention and the KV cache do not follow the mean).
    ``kwargs``: as ``estimate``. The row's keep is the mean count, with its p50 / p90."""
    from pipeline.pruning import per_image_stats

    counts = [min(visual_tokens_in, max(1, round(s * visual_tokens_in))) for s in shares]
    weights: dict[int, int] = {}
    for c in counts:
        weights[c] = weights.get(c, 0) + 1
    rows = {c: estimate(keep=c, visual_tokens_in=visual_tokens_in, **kwargs) for c in weights}

    def avg(get: object) -> float:
        return sum(weights[c] * get(r) for c, r in rows.items()) / len(counts)  # type: ignore[operator]

    gpu_s = avg(lambda r: r.gpu_seconds_per_image)
    gpu_s_rows = avg(lambda r: r.gpu_seconds_per_image_per_row_questions)
    flops_rows = avg(lambda r: r.flops_per_image_per_row_questions)
    stats = per_image_stats(counts)
    first = next(iter(rows.values()))
    return PlanRow(
        model=first.model, method=first.method, keep=round(stats["mean"]), estimated=True, source="estimate",
        accelerator=first.accelerator, engine=first.engine, generated_tokens=first.generated_tokens,
        generated_tokens_from=first.generated_tokens_from,
        flops_vision_per_image=avg(lambda r: r.flops_vision_per_image),
        flops_prefill_per_image=avg(lambda r: r.flops_prefill_per_image),
        flops_decode_per_image=avg(lambda r: r.flops_decode_per_image),
        flops_per_image=avg(lambda r: r.flops_per_image),
        kv_cache_bytes_per_image=avg(lambda r: r.kv_cache_bytes_per_image),
        gpu_seconds_per_image=gpu_s, decode_share=avg(lambda r: r.decode_share * r.gpu_seconds_per_image) / gpu_s,
        images_per_second_per_gpu=1 / gpu_s, vision_images_per_second=first.vision_images_per_second,
        llm_images_per_second=1 / avg(lambda r: 1 / r.llm_images_per_second),
        usd_per_1k_images=avg(lambda r: r.usd_per_1k_images), wall_hours=avg(lambda r: r.wall_hours),
        total_usd=avg(lambda r: r.total_usd), kept_p50=stats["p50"], kept_p90=stats["p90"], kept_from=kept_from,
        tasks_per_image=first.tasks_per_image, flops_per_image_per_row_questions=flops_rows,
        gpu_seconds_per_image_per_row_questions=gpu_s_rows,
        usd_per_1k_images_per_row_questions=avg(lambda r: r.usd_per_1k_images_per_row_questions),
        encode_once_flops_saving=1 - avg(lambda r: r.flops_per_image) / flops_rows,
        encode_once_saving=1 - gpu_s / gpu_s_rows, state_bytes_per_sequence=first.state_bytes_per_sequence,
    )


def run_generated_tokens(run: str) -> tuple[float, int]:
    """(mean generated tokens, answered rows) of a run's output: its ``generated_tokens`` column
    over the rows whose ``error`` is empty (error rows generated nothing worth counting)."""
    ds = locate(run).parquet_dataset()
    missing = {"generated_tokens", "error"} - set(ds.schema.names)
    if missing:
        raise ValueError(f"{run}: the output has no {', '.join(sorted(missing))} column")
    t = ds.to_table(columns=["generated_tokens", "error"])
    tokens = [g for g, e in zip(t.column("generated_tokens").to_pylist(), t.column("error").to_pylist(), strict=True)
              if not e and g is not None]
    if not tokens:
        raise ValueError(f"{run}: no answered rows to measure")
    return sum(tokens) / len(tokens), len(tokens)


def generated_tokens_for_estimates(given: int | None, runs: list[str], assumed: int,
                                   per: str = "image") -> tuple[int, str, str]:
    """The generated tokens per image the estimates use, where it came from (one of GENERATED_FROM)
    and a sentence for the plan: ``given`` (--generated-tokens) wins; else the mean over every
    answered row of ``runs``, rounded to a whole token (the decode term counts steps); else
    ``assumed`` (the accelerator table's). ``per``: what the figure is per in the sentence (with a
    task spec, each task without its own max_new_tokens)."""
    if given is not None:
        return given, "given", f"Estimates generate {given} tokens per {per}: given (--generated-tokens)."
    if runs:
        measured = [run_generated_tokens(r) for r in runs]
        rows = sum(n for _, n in measured)
        mean = sum(g * n for g, n in measured) / rows
        tokens = max(1, math.floor(mean + 0.5))
        return tokens, "measured from runs", (
            f"Estimates generate {tokens} tokens per {per}: measured from runs (mean {mean:.2f} over {rows} answered "
            f"rows of {len(runs)} run(s), rounded; --generated-tokens overrides).")
    return assumed, "assumed", (
        f"Estimates generate {assumed} tokens per {per}: assumed (assumptions.generated_tokens; give "
        f"--generated-tokens, or --runs of a corpus like the one planned, to plan for its answer lengths).")


def task_loads(tasks: Sequence[TaskConfig], generated: int, generated_from: str,
               max_new_tokens: int | None) -> list[TaskLoad]:
    """The estimate's view of a task spec: each task generates its own ``max_new_tokens`` (TASK_FROM;
    under vllm an upper bound, what the task may generate), else ``generated`` (the estimates'
    figure, from ``generated_from``) with ``max_new_tokens`` (generation.max_new_tokens) its cap."""
    return [TaskLoad(t.name, t.max_new_tokens, TASK_FROM, t.max_new_tokens) if t.max_new_tokens
            else TaskLoad(t.name, generated, generated_from, max_new_tokens) for t in tasks]


def tasks_note(loads: Sequence[TaskLoad], source: str, text_tokens: int) -> str:
    """The plan's note on its task spec: the tasks, each one's generated tokens and where they came
    from, and what the encode-once columns compare."""
    each = ", ".join(
        f"{t.name} {t.generated_tokens} ({'its max_new_tokens' if t.generated_from == TASK_FROM else t.generated_from})"
        for t in loads)
    return (f"Tasks per image: {len(loads)} ({source}); generated tokens per task: {each}; "
            f"{sum(t.generated_tokens for t in loads)} per image. Each task's prompt is the kept visual tokens + "
            f"{text_tokens} text tokens, prefilled and decoded per task; the image is encoded once (vision paid once "
            f"per image). The 1-row-per-question columns (*_per_row_questions) ask the same questions as one row each, "
            f"the image encoded once per task; encode_once_saving is 1 - GPU-seconds (so $) encoding once / one row "
            f"per question, encode_once_flops_saving the same of FLOPs.")


def add_cpu_side(rows: list[PlanRow], prepare_ms: float, cores_given_per_gpu: float | None) -> None:
    """Fill the CPU-side columns of the estimate rows (measured rows keep them null) for images
    that take ``prepare_ms`` CPU ms each to prepare, the config's preparation pool giving each GPU
    ``cores_given_per_gpu`` cores (``cpu_side.prepare_cores_per_gpu``; None: no GPU pools, so no
    rate and no flag)."""
    from .cpu_side import cores_per_gpu, cpu_images_per_second

    for row in rows:
        if not row.estimated or row.images_per_second_per_gpu is None:
            continue
        row.prepare_ms_per_image = prepare_ms
        row.cpu_cores_per_gpu = cores_per_gpu(prepare_ms, row.images_per_second_per_gpu)
        if cores_given_per_gpu is not None:
            row.cpu_images_per_second_per_gpu = cpu_images_per_second(prepare_ms, cores_given_per_gpu)
            row.cpu_bound = row.cpu_images_per_second_per_gpu < row.images_per_second_per_gpu


def cpu_side_note(table_source: str, table_path: str, family: str, size: str, prepare_ms: float | None,
                  prepare_cores: float, gpus: float) -> str:
    """The plan's note on its CPU-side columns: where the table came from and what the config's
    preparation pool gives each GPU."""
    if prepare_ms is None:
        return (f"CPU side: {table_path} ({table_source}) has no figures for family {family}: the CPU columns "
                f"are empty.")
    pool = (f"the config's prepare_stage gives {prepare_cores:g} cores at full size (max_pool_size x min(num_cpus, "
            f"1)) to the {gpus:g} GPUs of its GPU pools at full size, {prepare_cores / gpus:.3g} per GPU"
            if gpus else "the config has no GPU pools, so no CPU rate per GPU and no CPU-bound flag")
    return (f"CPU side: preparing a {size} image (decode + the processor's resize, one thread) takes "
            f"{prepare_ms:.3g} CPU ms ({table_path}, {table_source}); CPU cores/GPU = that x img/s/GPU / 1000 "
            f"keeps one GPU fed; {pool}; CPU-bound: the pool's images/s per GPU below the GPU's.")


def add_savings(rows: list[PlanRow]) -> None:
    """saving_vs_keep_all against the keep-all row of the same model, accelerator, kind (estimate /
    measured) and decode engine; null when there is none."""

    def key(r: PlanRow) -> tuple:
        return r.model, r.accelerator, r.estimated, r.engine

    for row in rows:
        base = [r for r in rows if key(r) == key(row) and r.method == "none"]
        if base:
            row.saving_vs_keep_all = 1 - row.total_usd / base[0].total_usd


def write_plan(rows: list[PlanRow], out: Path, *, images: int, gpus: int, notes: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "plan.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    (out / "plan.md").write_text(markdown(rows, images=images, gpus=gpus, notes=notes))
    chart(rows, out / "plan.png", images=images)


def table(rows: list[PlanRow]) -> str:
    """The plan's table; with several tasks per image (a task spec) also the same questions as one
    row each and what encoding once saves."""
    head = ["model", "accelerator", "method", "keep", "kind", "engine", "gen tok", "kept p50 / p90", "TFLOP/img", "prefill TFLOP",
            "decode TFLOP", "decode share", "KV MB", "img/s/GPU", "$/1k img", "wall h", "total $", "saving",
            "prep ms/img", "CPU cores/GPU", "CPU img/s/GPU", "CPU-bound"]
    several = any(r.tasks_per_image > 1 for r in rows)
    if several:
        head += ["tasks/img", "vision TFLOP/img", "TFLOP/img, 1 row/question", "$/1k img, 1 row/question",
                 "encode-once saving (FLOPs / $)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.model, r.accelerator, r.method, str(r.keep), _kind(r), r.engine, f"{r.generated_tokens:.3g}",
            "-" if r.kept_p50 is None else f"{r.kept_p50:g} / {r.kept_p90:g}", f"{r.flops_per_image / 1e12:.3g}", f"{r.flops_prefill_per_image / 1e12:.3g}",
            f"{r.flops_decode_per_image / 1e12:.3g}",
            "-" if r.decode_share is None else f"{100 * r.decode_share:.0f} %",
            f"{r.kv_cache_bytes_per_image / 1e6:.4g}",
            _fmt(r.images_per_second_per_gpu), f"{r.usd_per_1k_images:.4g}", f"{r.wall_hours:.4g}",
            f"{r.total_usd:,.0f}" if r.total_usd >= 100 else f"{r.total_usd:.4g}",
            "" if r.saving_vs_keep_all is None else f"{100 * r.saving_vs_keep_all:.1f} %",
            _fmt(r.prepare_ms_per_image), _fmt(r.cpu_cores_per_gpu), _fmt(r.cpu_images_per_second_per_gpu),
            "-" if r.cpu_bound is None else ("yes" if r.cpu_bound else "no"),
        ]
        if several:
            if r.flops_per_image_per_row_questions is None:  # measured rows
                cells += ["-", f"{r.flops_vision_per_image / 1e12:.3g}", "-", "-", "-"]
            else:
                cells += [str(r.tasks_per_image), f"{r.flops_vision_per_image / 1e12:.3g}",
                          f"{r.flops_per_image_per_row_questions / 1e12:.3g}",
                          f"{r.usd_per_1k_images_per_row_questions:.4g}",
                          f"{100 * r.encode_once_flops_saving:.1f} % / {100 * r.encode_once_saving:.1f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rows: list[PlanRow], *, images: int, gpus: int, notes: list[str]) -> str:
    kinds = {f"{'estimate' if r.estimated else 'measured'} (decode engine {r.engine})" for r in rows}
    title = f"# Cost plan: {images:,} images on {gpus} accelerator(s)"
    body = [title, "", f"Rows: {', '.join(sorted(kinds))}. Estimates are estimates: see the assumptions below.", "",
            table(rows), "", "## Assumptions and sources", ""]
    body += [f"- {n}" for n in notes]
    body += ["", "![cost and throughput against the budget](plan.png)", ""]
    return "\n".join(body)


def chart(rows: list[PlanRow], path: Path, *, images: int) -> None:
    """Per (model, accelerator) group: $ per 1,000 images and images/s per GPU against the number
    of visual tokens kept, one line per method (estimates dashed, measured solid); keep-all is a
    star with a grey reference line, and each budget is annotated with its saving."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[PlanRow]] = {}
    for r in rows:
        groups.setdefault((r.model, r.accelerator), []).append(r)
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4 * len(groups)), squeeze=False)
    for row_axes, ((model, acc), members) in zip(axes, groups.items(), strict=True):
        ax_cost, ax_speed = row_axes
        for (method, est, engine), line in _lines(members).items():
            kind = f"{'estimate' if est else 'measured'}, {engine}"
            style = {"linestyle": "--" if est else "-"}
            speed = [p.images_per_second_per_gpu or _replica_speed(p, images) for p in line]
            if method == "none":  # the reference every budget is compared with
                for ax, ys in ((ax_cost, [p.usd_per_1k_images for p in line]), (ax_speed, speed)):
                    ax.axhline(ys[0], color="grey", linewidth=1, **style)
                    ax.plot([p.keep for p in line], ys, "*", markersize=12, color="black", label=f"keep all ({kind})")
                continue
            line = sorted(line, key=lambda r: r.keep)
            speed = [p.images_per_second_per_gpu or _replica_speed(p, images) for p in line]
            ax_cost.plot([p.keep for p in line], [p.usd_per_1k_images for p in line], marker="o",
                         label=f"{method} ({kind})", **style)
            ax_speed.plot([p.keep for p in line], speed, marker="o", label=f"{method} ({kind})", **style)
            for p in line:
                if p.saving_vs_keep_all is not None:
                    ax_cost.annotate(f"-{100 * p.saving_vs_keep_all:.0f}%", (p.keep, p.usd_per_1k_images),
                                     textcoords="offset points", xytext=(4, -12), fontsize=8)
        unit = "GPU" if any(r.images_per_second_per_gpu for r in members) else "replica (CPU only)"
        for ax, ylabel in ((ax_cost, "$ per 1,000 images"), (ax_speed, f"images/s per {unit}")):
            ax.set_xlabel("visual tokens kept per image (star: every token kept)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{model} on {acc}")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _lines(rows: list[PlanRow]) -> dict[tuple[str, bool, str], list[PlanRow]]:
    out: dict[tuple[str, bool, str], list[PlanRow]] = {}
    for r in rows:  # an estimate from a measured distribution is a point of its own
        method = r.method if r.kept_from in ("budget", "this run") else f"{r.method} (kept as measured)"
        out.setdefault((method, r.estimated, r.engine), []).append(r)
    return out


def _replica_speed(r: PlanRow, images: int) -> float:
    return images / (r.wall_hours * 3600)


def _kind(r: PlanRow) -> str:
    if not r.estimated:
        return "measured"
    return "estimate" if r.kept_from == "budget" else f"estimate, kept tokens: {r.kept_from}"


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3g}"


def engine_note(engine: str, assume: Utilisation, max_new_tokens: int | None) -> str:
    """What the estimates' decode term assumes of the engine (stated with every plan)."""
    gen = assume.generated_tokens
    over = (f" The planned {gen} generated tokens exceed the config's generation.max_new_tokens = {max_new_tokens}: "
            f"a run of this config would stop at {max_new_tokens}; raise it for such a corpus."
            if max_new_tokens and gen > max_new_tokens else "")
    spec = engine_spec(engine)
    if spec.schedules_batches:
        return (f"Estimates assume the {spec.title} decode engine (decode_stage.engine: {engine}): continuous "
                f"batching keeps {assume.decode_batch} rows in every decode step, a finished row's slot going to the "
                f"next row at once, so an image pays for its own {gen} generated tokens. Measured rows state the "
                f"engine their run used (column engine).{over}")
    paid = paid_tokens(engine, gen, max_new_tokens)
    cap = f"the cap, generation.max_new_tokens = {max_new_tokens}" if max_new_tokens else "no cap given"
    return (f"Estimates assume the {spec.title} decode engine (decode_stage.engine: {engine}): static batches of "
            f"{assume.decode_batch} rows that decode until their longest row stops ({cap}); finished rows keep "
            f"their slot and KV cache until then, so an image pays for {paid} tokens' decode steps while generating "
            f"{gen}. Prompt padding is left out (the decode stage groups rows of similar length). Measured rows "
            f"state the engine their run used (column engine).{over}")


def state_note(shapes: ModelShapes, bytes_per_element: int = 2) -> str | None:
    """What a hybrid decoder's plan must say: the KV cache, which pruning shrinks, is only the
    attention layers', and the fixed state it cannot shrink is read and written at every decode
    step. None for a dense decoder."""
    lang = shapes.language
    state = state_bytes(lang, bytes_per_element)
    if not state:
        return None
    per_token = kv_cache_bytes(lang, 1, 1, bytes_per_element)
    return (f"Hybrid decoder: a KV cache in {lang.attention_layers} of its {lang.layers} layers only "
            f"({per_token / 1024:.0f} KiB a token); every sequence also holds {state / 2**20:.1f} MiB of "
            f"linear-attention state ({lang.linear.layers} layers, column state_bytes_per_sequence), which each "
            "decode step reads and writes and pruning does not shrink.")


def assumption_notes(assume: Utilisation, accelerator_name: str, accelerator: Accelerator, price: Price,
                     engine: str = DEFAULT_ENGINE, max_new_tokens: int | None = None,
                     generated_note: str | None = None) -> list[str]:
    """The plan's stated assumptions; ``generated_note``: where the generated tokens per image came
    from (``generated_tokens_for_estimates``), default: the accelerator table's assumption."""
    if generated_note is None:
        generated_note = generated_tokens_for_estimates(None, [], assume.generated_tokens)[2]
    return [
        f"Accelerator {accelerator_name}: {accelerator.bf16_flops / 1e12:.0f} TFLOP/s bf16, "
        f"{accelerator.memory_bandwidth / 1e12:.1f} TB/s ({accelerator.source}, {accelerator.date}).",
        f"Price {accelerator_name}: ${price.usd_per_hour}/GPU-hour ({price.source}, {price.date}).",
        f"Estimates assume vision at {assume.vision_mfu:.0%} and prefill at {assume.prefill_mfu:.0%} of the bf16 "
        f"ceiling, decode at {assume.decode_bandwidth:.0%} of memory bandwidth with {assume.decode_batch} rows per "
        f"step, {assume.text_tokens} text tokens per image, bf16 weights and KV cache ({assume.source}).",
        generated_note,
        engine_note(engine, assume, max_new_tokens),
        "Estimates leave out CPU-only stages and ResPrune's selection (< 1 % of the vision FLOPs); measured rows "
        "include everything each stage's actors spent on a row, but not start-up or idle time (see each run's "
        "manifest, cost.reserved.utilisation).",
        "FLOPs: 2 per multiply-add, full L x L attention scores (FlopCounterMode's convention).",
        "Wall time scales linearly with the number of accelerators (data-parallel replicas, no shared bottleneck).",
    ]


