"""What every stage does the same way: row errors, per-row fallback, timing, threads."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

Batch = dict[str, Any]


def errors_of(batch: Batch) -> list[str]:
    n = len(batch["id"])
    return [str(e) for e in batch["error"]] if "error" in batch else [""] * n


def list_column(values: Any) -> list[list]:
    """Ray hands list columns to numpy batches as arrays of arrays; returning them as Python
    lists keeps them Arrow lists (not pickled objects) between stages."""
    return [list(v) for v in values]


# The stages' list columns: per task (``task_*``) or per selection (the encode stage's), some
# nested. Every stage hands them on as Python lists (``as_lists``), so Arrow keeps them lists
# instead of Ray pickling the arrays of arrays it hands to numpy batches.
LIST_COLUMNS = (
    "task_prompt", "task_nouns", "task_error", "task_selection", "task_answer", "task_prompt_tokens",
    "task_generated_tokens", "task_truncated", "kept_indices", "energy_explained", "relevance_min",
    "relevance_mean", "relevance_max", "visual_payload",
)


def as_lists(batch: Batch) -> Batch:
    """``batch`` with its ``LIST_COLUMNS`` as (nested) Python lists."""
    for name in LIST_COLUMNS:
        if name in batch:
            batch[name] = [_nested(v) for v in batch[name]]
    return batch


def _nested(value: Any) -> Any:
    if isinstance(value, (np.ndarray, list, tuple)):
        return [_nested(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def ok_rows(errors: Sequence[str]) -> list[int]:
    return [i for i, e in enumerate(errors) if not e]


def map_splitting_failures(fn: Callable[[list[T]], list[R]], items: list[T], what: str) -> list[R | str]:
    """``fn`` over the whole batch; if it raises, over each half, and so on down to single rows,
    so a transient failure costs a retry and a bad row costs only itself (at most 2n - 1 calls).
    Rows that still fail alone come back as an error string."""
    if not items:
        return []
    try:
        return list(fn(items))
    except Exception as e:  # noqa: BLE001 - isolate the failing rows, never lose the batch
        if len(items) == 1:
            return [f"{what} failed: {type(e).__name__}: {str(e)[:500]}"]
        log.warning("%s failed for a batch of %d (%s: %s); splitting it", what, len(items), type(e).__name__, e)
    half = len(items) // 2
    return map_splitting_failures(fn, items[:half], what) + map_splitting_failures(fn, items[half:], what)


class Stopwatch:
    """Wall time of a batch step, reported per processed row (the batch's time / its rows)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def per_row_ms(self, errors: Sequence[str]) -> np.ndarray:
        elapsed = 1e3 * (time.perf_counter() - self.start)
        n_ok = max(1, sum(1 for e in errors if not e))
        return np.array([0.0 if e else elapsed / n_ok for e in errors], dtype=np.float64)


def limit_torch_threads(num_cpus: float) -> None:
    """An actor reserving fractional CPUs must not spin up a thread per core: the pools share them."""
    torch.set_num_threads(max(1, int(round(num_cpus))))
