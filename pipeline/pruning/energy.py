"""The adaptive budget: keep what an image needs, by the residual energy ResPrune's greedy leaves.

Definition. For an image's visual tokens v_1..v_N (rows of V, the features the LLM would get)
and the first k tokens of ResPrune's greedy order S_k, the residual energy is

    R(k) = sum_i w_i ||v_i - P_k v_i||^2        (P_k: projection onto span(S_k))

over all N tokens, and the energy explained is E(k) = 1 - R(k) / R(0), R(0) = sum_i w_i ||v_i||^2.
Weights: w_i = 1 (``weighting: plain``, the default) or the text gate ``gate(r_i, alpha)``
(``weighting: gated``), the same gate the greedy scores with. E(k) is non-decreasing and reaches
1 once the picks span every token (at most D picks for D-dimensional features).

The rule (``energy_keep``): the smallest k in [min_keep, cap] with E(k) >= energy; the cap when
no prefix up to it explains that much. ``cap`` is the usual budget (``budget``: pruning.keep or
pruning.prune_ratio of the image's tokens); min_keep is clamped to the cap. The greedy's picks
are nested (its first k are the same for every budget >= k), so a batch runs it once to the cap
and cuts each row at its own k: the cost over a fixed budget of the cap is the energy trace
(one GEMM of the last block's rows) and nothing else.

Only ResPrune has the trace (the greedy computes it as it goes); other methods keep fixed budgets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

WEIGHTINGS = ("plain", "gated")


def energy_keep(explained: Tensor, energy: float, min_keep: int) -> Tensor:
    """Tokens to keep per row: the smallest k in [min(min_keep, cap), cap] with
    ``explained[..., k - 1] >= energy``, else the cap, where cap = ``explained.shape[-1]``.

    explained: [C] or [B, C], the energy each prefix of the greedy's picks explains
    (``resprune_trace``), non-decreasing. Returns a LongTensor [] / [B] of counts in [1, C]."""
    if not 0.0 < energy < 1.0 or not math.isfinite(energy):
        raise ValueError(f"energy must be a fraction in (0, 1), got {energy}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
        raise ValueError(f"min_keep must be an int >= 1, got {min_keep!r}")
    cap = explained.shape[-1]
    if cap < 1:
        raise ValueError("explained has no picks (cap = 0)")
    reached = explained >= energy
    # The first prefix that reaches the energy (argmax of a bool row is its first True), else the cap.
    first = reached.to(torch.uint8).argmax(-1) + 1
    first = torch.where(reached.any(-1), first, torch.full_like(first, cap))
    return first.clamp(min=min(min_keep, cap), max=cap)


def per_image_stats(values: Sequence[int | float]) -> dict[str, float | None]:
    """Mean, p50, p90, min and max of a per-image figure such as the kept-token count (nearest-rank
    percentiles, so each is a value some image actually had); None everywhere for no images."""
    values = sorted(values)
    if not values:
        return {"mean": None, "p50": None, "p90": None, "min": None, "max": None}

    def rank(p: float) -> float:
        return values[max(0, math.ceil(p / 100 * len(values)) - 1)]

    return {"mean": round(sum(values) / len(values), 6), "p50": rank(50), "p90": rank(90),
            "min": values[0], "max": values[-1]}
