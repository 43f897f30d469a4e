"""Input handling shared by every pruning method: shapes, dtypes, validation."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def as_batch(visual: Tensor) -> tuple[Tensor, bool]:
    """Return ``visual`` as a float32 [B, N, D] tensor and whether the input was batched.

    Half-precision inputs are promoted: selection arithmetic needs float32 at least.
    """
    if not isinstance(visual, Tensor):
        raise TypeError(f"visual must be a torch.Tensor, got {type(visual).__name__}")
    if visual.dim() == 2:
        batched, visual = False, visual.unsqueeze(0)
    elif visual.dim() == 3:
        batched = True
    else:
        raise ValueError(f"visual must have shape [N, D] or [B, N, D], got {tuple(visual.shape)}")
    if not visual.is_floating_point():
        raise ValueError(f"visual must be a floating-point tensor, got {visual.dtype}")
    if visual.shape[1] == 0:
        raise ValueError("visual has no tokens (N = 0)")
    if visual.dtype != torch.float64:
        visual = visual.float()
    check_finite("visual", visual)
    return visual, batched


def check_finite(name: str, t: Tensor) -> None:
    """Raise ValueError naming ``name`` and the first bad sample if ``t`` holds NaN or inf."""
    # A sum is one cheap streaming pass; it is non-finite whenever t has NaN/inf (or overflows),
    # and only then do we pay for the element-wise scan that names the problem.
    if torch.isfinite(t.sum()):
        return
    bad = ~torch.isfinite(t)
    if bad.any():
        kind = "NaN" if torch.isnan(t).any() else "inf"
        where = ""
        if t.dim() >= 3:
            sample = int(bad.flatten(1).any(1).nonzero()[0])
            where = f" (sample {sample})"
        raise ValueError(f"{name} contains {kind} values{where}")


def check_keep(keep: int) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ValueError(f"keep must be an int, got {type(keep).__name__}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    return keep


def budget(visual_tokens: int, *, keep: int | None = None, prune_ratio: float | None = None) -> int:
    """Tokens to keep of an image's ``visual_tokens``: up to ``keep``, or ``visual_tokens`` less
    ``prune_ratio`` of them rounded so that no more than that share is pruned (ceil), at least 1.
    Exactly one of the two is given."""
    if (keep is None) == (prune_ratio is None):
        raise ValueError("give exactly one budget: keep (a count) or prune_ratio (a fraction)")
    if visual_tokens < 1:
        raise ValueError(f"an image has at least one visual token, got {visual_tokens}")
    if keep is not None:
        return min(check_keep(keep), visual_tokens)
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
    # The 1e-9 absorbs float error: 2880 x (1 - 0.7777...) must give 640, not 641.
    return max(1, min(visual_tokens, math.ceil(visual_tokens * (1.0 - prune_ratio) - 1e-9)))


def keep_all(batch: int, n: int, device: torch.device) -> Tensor:
    """Indices of every token, [B, N]: what any method returns when keep >= N."""
    return torch.arange(n, device=device).expand(batch, n).clone()


def scores_as_batch(scores: Tensor, batch: int, n: int, name: str = "scores") -> Tensor:
    """Per-token scores as float [B, N], accepting [N] (broadcast) or [B, N]."""
    if scores.dim() == 1:
        scores = scores.unsqueeze(0).expand(batch, -1)
    if scores.shape != (batch, n):
        raise ValueError(f"{name} must have shape [N] or [B, N] = [{batch}, {n}], got {tuple(scores.shape)}")
    scores = scores.float()
    check_finite(name, scores)
    return scores


def unbatch(idx: Tensor, batched: bool) -> Tensor:
    return idx if batched else idx[0]
