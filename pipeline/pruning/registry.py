"""One registry of pruning methods, all with the same call signature."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from . import baselines
from .resprune import resprune_select


class PruneMethod(Protocol):
    def __call__(
        self,
        visual: Tensor,
        keep: int,
        *,
        relevance: Tensor | None = None,
        scores: Tensor | None = None,
        alpha: float = 0.75,
        rng_seed: int = 0,
    ) -> Tensor:
        """visual [N, D] / [B, N, D]; relevance: output of ``pruning.relevance`` (NaN = no text);
        scores: per-token model scores such as CLS attention [N] / [B, N].
        Returns indices [keep] / [B, keep] in the order selected."""
        ...


def _resprune(
    visual: Tensor,
    keep: int,
    *,
    relevance: Tensor | None = None,
    scores: Tensor | None = None,
    alpha: float = 0.75,
    rng_seed: int = 0,
) -> Tensor:
    # Model scores (CLS attention) seed the selection when the model has them (LLaVA);
    # otherwise the largest-norm token does (Qwen2.5-VL has no CLS).
    return resprune_select(visual, keep, relevance_scores=relevance, alpha=alpha, seed=scores)


METHODS: dict[str, PruneMethod] = {
    "none": baselines.keep_all_tokens,
    "random": baselines.random_select,
    "score_topk": baselines.score_topk,
    "divprune": baselines.divprune,
    "resprune": _resprune,
}

# Methods whose result depends on the prompt: the stages compute text relevance only for these.
TEXT_GUIDED = frozenset({"resprune"})


def get_method(name: str) -> PruneMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; known: {', '.join(sorted(METHODS))}") from None
