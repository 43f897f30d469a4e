"""One registry of pruning methods, all with the same call signature; and the methods that also
trace the energy their picks explain (``pipeline.pruning.energy``), which adaptive budgets need."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from . import baselines
from .resprune import resprune_select, resprune_trace


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


class TracedMethod(Protocol):
    def __call__(
        self,
        visual: Tensor,
        keep: int,
        *,
        relevance: Tensor | None = None,
        scores: Tensor | None = None,
        alpha: float = 0.75,
        gated: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """As ``PruneMethod``, run to min(keep, N) picks, plus the energy each prefix of the picks
        explains: (indices [B, K] in the order selected, explained [B, K] non-decreasing)."""
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


def _resprune_traced(
    visual: Tensor,
    keep: int,
    *,
    relevance: Tensor | None = None,
    scores: Tensor | None = None,
    alpha: float = 0.75,
    gated: bool = False,
) -> tuple[Tensor, Tensor]:
    return resprune_trace(visual, keep, relevance_scores=relevance, alpha=alpha, seed=scores, gated=gated)


METHODS: dict[str, PruneMethod] = {
    "none": baselines.keep_all_tokens,
    "random": baselines.random_select,
    "score_topk": baselines.score_topk,
    "divprune": baselines.divprune,
    "resprune": _resprune,
}

# Methods with an energy trace (the same picks as their METHODS entry): only these take pruning.energy.
ENERGY_TRACED: dict[str, TracedMethod] = {"resprune": _resprune_traced}

# Methods whose result depends on the prompt: the stages compute text relevance only for these.
TEXT_GUIDED = frozenset({"resprune"})


def get_method(name: str) -> PruneMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; known: {', '.join(sorted(METHODS))}") from None
