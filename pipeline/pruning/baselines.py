"""Baseline pruning methods, for comparing against ResPrune on your own data.

Every method here has the registry signature (see ``registry.PruneMethod``) and returns token
indices [B, keep] in the order selected; keep >= N returns all N in index order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import as_batch, check_keep, keep_all, scores_as_batch, unbatch


def keep_all_tokens(visual: Tensor, keep: int, **_: object) -> Tensor:
    """``none``: no pruning, every token in index order (``keep`` is ignored)."""
    v, batched = as_batch(visual)
    return unbatch(keep_all(v.shape[0], v.shape[1], v.device), batched)


def random_select(visual: Tensor, keep: int, *, rng_seed: int = 0, **_: object) -> Tensor:
    """``random``: a uniform random subset, reproducible from ``rng_seed``."""
    check_keep(keep)
    v, batched = as_batch(visual)
    b, n, _ = v.shape
    if keep >= n:
        return unbatch(keep_all(b, n, v.device), batched)
    gen = torch.Generator().manual_seed(rng_seed)
    idx = torch.rand((b, n), generator=gen).argsort(dim=-1)[:, :keep]
    return unbatch(idx.to(v.device), batched)


def score_topk(visual: Tensor, keep: int, *, scores: Tensor | None = None, **_: object) -> Tensor:
    """``score_topk``: the ``keep`` tokens with the highest per-token score (e.g. CLS attention,
    as in FasterVLM), highest first."""
    check_keep(keep)
    v, batched = as_batch(visual)
    b, n, _ = v.shape
    if scores is None:
        raise ValueError("method score_topk needs per-token scores (e.g. CLS attention); the model gave none")
    s = scores_as_batch(scores.to(v.device), b, n)
    if keep >= n:
        return unbatch(keep_all(b, n, v.device), batched)
    return unbatch(s.topk(keep, dim=-1).indices, batched)


def divprune(visual: Tensor, keep: int, **_: object) -> Tensor:
    """``divprune``: greedy max-min cosine distance (DivPrune, Alvar et al. 2025).

    First pick: the token whose nearest other token is farthest; then repeatedly the token whose
    minimum cosine distance to the selected set is largest.
    """
    check_keep(keep)
    v, batched = as_batch(visual)
    b, n, _ = v.shape
    if keep >= n:
        return unbatch(keep_all(b, n, v.device), batched)
    vn = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dist = 1.0 - torch.bmm(vn, vn.transpose(1, 2))  # [B, N, N] cosine distance
    ar = torch.arange(b, device=v.device)
    eye = torch.eye(n, dtype=torch.bool, device=v.device)
    nearest_other = dist.masked_fill(eye, float("inf")).amin(dim=-1)
    order = torch.empty((b, keep), dtype=torch.long, device=v.device)
    chosen = torch.zeros((b, n), dtype=torch.bool, device=v.device)
    j = nearest_other.argmax(dim=-1)
    min_dist = torch.full((b, n), float("inf"), device=v.device)
    for t in range(keep):
        if t:
            j = min_dist.masked_fill(chosen, float("-inf")).argmax(dim=-1)
        order[:, t] = j
        chosen[ar, j] = True
        min_dist = torch.minimum(min_dist, dist[ar, j])
    return unbatch(order, batched)
