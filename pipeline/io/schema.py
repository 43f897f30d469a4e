"""The job's input and output schemas: the public data contract, declared once.

Input (Parquet; extra columns pass through to the output; image files and tar shards are read
into the same columns: docs/inputs.md):
    id: string (unique), image: binary (JPEG/PNG/WebP bytes), prompt: string

Output (Parquet, one row per input row, never the image bytes):
    id, prompt          as read
    answer              generated text ("" when the row has an error)
    error               "" when fine, else "<kind>: <detail>"; kinds: missing prompt, invalid prompt,
                        prompt too long, missing image, corrupt image, image too large, image too
                        small, unsupported image mode, prepare failed, encode failed, decode failed
                        (ERROR_KINDS)
    method              pruning method
    keep                the budget applied to this row: pruning.keep capped at the row's
                        visual_tokens_in, or visual_tokens_in less pruning.prune_ratio of them
                        (pipeline.pruning.budget); every token for method `none`; with
                        pruning.energy, the cap of the row's adaptive budget
    visual_tokens_in    visual tokens the model would hand its LLM for the image unpruned
                        (LLaVA-NeXT: base view and tiles after unpadding, newline tokens included)
    visual_tokens_kept  visual tokens the LLM received (adaptive budget: where the row stopped)
    energy_explained    method resprune: the share of the image's token energy (weighted as
                        pruning.energy_weighting says) inside the span of the kept tokens, in
                        [0, 1] (pipeline.pruning.energy); null for other methods
    encoder_patches     patch tokens the vision encoder ran over (every view or tile; Qwen2.5-VL:
                        before the 2x2 merge), which the vision FLOPs follow
    kept_indices        which ones, ascending (spatial order)
    nouns, extractor    text guidance and which extractor produced it
    relevance_min/mean/max   per-row text relevance of the visual tokens (null when no
                        nouns, or when the method does not use text)
    prompt_tokens       sequence length prefilled (text + kept visual tokens)
    generated_tokens    tokens generated (up to and including EOS)
    prompt_truncated    the prompt was over the limit and cut to its first tokens (input.long_prompt:
                        truncate); `prompt` still holds it as read
    text_ms, prepare_ms, encode_ms, prune_ms, decode_ms   stage wall time per row (batch time / rows);
                        prepare_ms: decoding the image and the CPU's share of the image processor

Cost columns (null on error rows; see pipeline/cost/flops.py for the FLOP convention):
    flops_vision        vision encoder (patch embedding + every layer that runs) + projector
    flops_prefill       LLM prefill over prompt_tokens (+ the LM head row of the first token)
    flops_prefill_unpruned   the same with every visual token kept
    flops_decode        the generated_tokens - 1 decode steps after prefill, attention over the cache
    flops_total, flops_total_unpruned   vision + prefill + decode, pruned / every token kept
                        (same generated_tokens)
    kv_cache_bytes, kv_cache_bytes_unpruned   K and V of every layer at the end of generation,
                        at the dtype the LLM ran in
    gpu_seconds, cpu_seconds   each stage's per-row time x the GPUs / CPUs its actors reserve
    cost_usd            gpu_seconds x the accelerator's $/h + CPU-only stages' cpu_seconds x the
                        CPU core's $/h (cost.prices); CPUs of GPU stages come with the GPU's price
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.tasks import TaskSpec, answer_type, one_answer, task_fields, to_arrow_value

from .images import IMAGE_ERROR_KINDS

INPUT_COLUMNS = ("id", "image", "prompt")
ERROR_KINDS = (
    "missing prompt", "invalid prompt", "prompt too long",  # text stage; prompt too long: decode stage
    *IMAGE_ERROR_KINDS,  # pipeline/io/images.py
    "prepare failed", "encode failed", "decode failed",  # the image processor or the model raised on this row alone
    "invalid answer",  # a choice or JSON task's answer that does not parse: generation stopped first
)

OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("answer", pa.string()),
        ("error", pa.string()),
        ("method", pa.string()),
        ("keep", pa.int32()),
        ("visual_tokens_in", pa.int32()),
        ("visual_tokens_kept", pa.int32()),
        ("energy_explained", pa.float32()),
        ("kept_indices", pa.list_(pa.int32())),
        ("encoder_patches", pa.int32()),
        ("nouns", pa.list_(pa.string())),
        ("extractor", pa.string()),
        ("relevance_min", pa.float32()),
        ("relevance_mean", pa.float32()),
        ("relevance_max", pa.float32()),
        ("prompt_tokens", pa.int32()),
        ("generated_tokens", pa.int32()),
        ("prompt_truncated", pa.bool_()),
        ("text_ms", pa.float32()),
        ("prepare_ms", pa.float32()),
        ("encode_ms", pa.float32()),
        ("prune_ms", pa.float32()),
        ("decode_ms", pa.float32()),
        ("flops_vision", pa.int64()),
        ("flops_prefill", pa.int64()),
        ("flops_prefill_unpruned", pa.int64()),
        ("flops_decode", pa.int64()),
        ("flops_total", pa.int64()),
        ("flops_total_unpruned", pa.int64()),
        ("kv_cache_bytes", pa.int64()),
        ("kv_cache_bytes_unpruned", pa.int64()),
        ("gpu_seconds", pa.float64()),
        ("cpu_seconds", pa.float64()),
        ("cost_usd", pa.float64()),
    ]
)
COST_COLUMNS = (
    "flops_vision", "flops_prefill", "flops_prefill_unpruned", "flops_decode", "flops_total", "flops_total_unpruned",
    "kv_cache_bytes", "kv_cache_bytes_unpruned", "gpu_seconds", "cpu_seconds", "cost_usd",
)
STAGE_TIME_COLUMNS = {  # the per-row time columns each stage's actors spend (billed at their reservation)
    "text_stage": ("text_ms",),
    "prepare_stage": ("prepare_ms",),
    "encode_stage": ("encode_ms", "prune_ms"),
    "decode_stage": ("decode_ms",),
}
# Internal columns that never reach the output.
DROPPED = ("image", "image_error", "prepared_image", "visual_kept", "visual_payload")
# Columns of one answer: in the one-answer layout the first (only) task's, taken from the per-task
# (``task_*``) and per-selection lists the stages carry; with a task spec each task's own columns.
ANSWER_COLUMNS = ("prompt", "answer", "visual_tokens_kept", "energy_explained", "kept_indices", "nouns",
                  "relevance_min", "relevance_mean", "relevance_max", "prompt_tokens", "generated_tokens",
                  "prompt_truncated")
INTERNAL = ("task_prompt", "task_nouns", "task_error", "task_selection", "task_answer", "task_prompt_tokens",
            "task_generated_tokens", "task_truncated", "task_flops", "task_kv_cache_bytes", "kept_indices",
            "energy_explained", "relevance_min", "relevance_mean", "relevance_max")


def output_schema(spec: TaskSpec) -> pa.Schema:
    """The contract's columns for a run: ``OUTPUT_SCHEMA`` without a task spec; with one, the
    shared columns, then each task's (``pipeline.tasks.task_fields``)."""
    if spec.one_answer:
        return OUTPUT_SCHEMA
    shared = [f for f in OUTPUT_SCHEMA if f.name not in ANSWER_COLUMNS]
    return pa.schema(shared + [f for t in spec.tasks for f in task_fields(t)])


def _py(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:  # NaN -> null (numpy batches turn nulls into NaN)
        return None
    return value


def answer_columns(batch: dict[str, Any], spec: TaskSpec) -> dict[str, list]:
    """Per task, its output columns from the stages' per-task and per-selection lists."""
    n = len(batch["id"])
    columns: dict[str, list] = {}
    for j, task in enumerate(spec.tasks):
        name = task.name if not spec.one_answer else None
        kind = answer_type(task)

        def pick(key: str, i: int, by_selection: bool = False, _j: int = j) -> Any:
            if by_selection:
                s = int(batch["task_selection"][i][_j])
                return _py(batch[key][i][s]) if s >= 0 else None
            return _py(batch[key][i][_j])

        errors = [str(pick("task_error", i)) or str(batch["error"][i]) for i in range(n)]
        answers = []
        for i in range(n):
            text = pick("task_answer", i)
            if errors[i]:
                answers.append("" if spec.one_answer else None)
            elif task.type == "json":
                answers.append(to_arrow_value(json.loads(text), kind))
            else:
                answers.append(text)
        kept = [pick("kept_indices", i, True) or [] for i in range(n)]
        values = {
            "answer": answers,
            "error": errors,
            "prompt_tokens": [pick("task_prompt_tokens", i) for i in range(n)],
            "generated_tokens": [pick("task_generated_tokens", i) for i in range(n)],
            "prompt_truncated": [bool(pick("task_truncated", i)) for i in range(n)],
            "visual_tokens_kept": [len(k) for k in kept],
            "kept_indices": kept,
            "nouns": [list(pick("task_nouns", i) or []) for i in range(n)],
        }
        if spec.one_answer:
            values["error"] = [str(e) for e in batch["error"]]
            values["prompt"] = [_py(p) for p in batch["prompt"]]
            for key in ("energy_explained", "relevance_min", "relevance_mean", "relevance_max"):
                values[key] = [pick(key, i, True) for i in range(n)]
            return values
        values["flops"] = [pick("task_flops", i) for i in range(n)]
        values["kv_cache_bytes"] = [pick("task_kv_cache_bytes", i) for i in range(n)]
        for key, column in values.items():
            columns[name if key == "answer" else f"{name}_{key}"] = column
    return columns


def to_output_table(batch: dict[str, Any], spec: TaskSpec | None = None) -> pa.Table:
    """A numpy-format batch (after the cost step) -> an Arrow table with the run's contract
    (``output_schema``; ``spec`` None: no task spec), then the extra input columns."""
    spec = spec or one_answer()
    schema = output_schema(spec)
    derived = answer_columns(batch, spec)
    arrays = []
    for f in schema:
        values = derived[f.name] if f.name in derived else [_py(v) for v in batch[f.name]]
        arrays.append(pa.array(values, type=f.type))
    fields = list(schema)
    for name, values in batch.items():
        if name in schema.names or name in DROPPED or name in INTERNAL or name in derived:
            continue
        arrays.append(pa.array([_py(v) for v in values]))
        fields.append(pa.field(name, arrays[-1].type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))
