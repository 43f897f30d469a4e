"""ResPrune: text-gated greedy residual-energy selection of visual tokens.

Definition (paper, Sec. III-C/D): start from a seed token; then repeatedly pick the unselected
token i maximising ``gate(r_i) * ||v_i - P_S v_i||^2``, where ``P_S`` projects onto the span of
the tokens chosen so far and ``r_i`` is the token's text relevance.

Implementation: greedy max-residual Gram-Schmidt is exactly pivoted (partial) Cholesky on the
Gram matrix ``G = V V^T`` (see ``shared/notes/resprune-method.md``). We pay one batched GEMM
for ``G`` and then K cheap steps on [B, N] vectors, instead of K passes over [B, N, D].
When ``G`` would not fit (``max_gram_bytes``) its rows are computed on demand, ``V @ v_j``:
the same recurrence, O(N D) per step, no N x N buffer.

Precision: ``G`` is formed in float32 (the GEMM floor); the recurrence (``L`` and the residual
energies) runs in float64 because it subtracts from ``G_ii ~ ||v_i||^2`` and float32 would turn
small residuals into rounding noise. Residuals below ``sqrt(D) * eps32 * ||v_i||^2`` are below
what a float32 Gram can resolve: such tokens count as already spanned (rank exhausted) and are
only picked once nothing else is left, highest gate weight first.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import as_batch, check_finite, check_keep, keep_all, scores_as_batch, unbatch

# The gate maps cosine r in [-1, 1] to s = (1 + r) / 2 in [0, 1], then w = s ** alpha.
# The floor keeps w > 0 at r = -1 so no token is ever made unselectable by the gate alone.
_GATE_FLOOR = 1e-6
_DEFAULT_MAX_GRAM_BYTES = 1 << 30


def relevance(visual: Tensor, text: Tensor | list[Tensor | None] | None) -> Tensor:
    """Text relevance of each visual token: max over text tokens of cosine similarity.

    visual: [N, D] or [B, N, D]. text: [M, D] (shared by every sample), [B, M, D], or a list of
    B tensors [M_b, D] (None or M_b = 0 for a sample without text).
    Returns float32 [N] / [B, N] in [-1, 1]; NaN for a sample that has no text, meaning
    "no guidance" (``gate`` turns NaN into weight 1).
    """
    v, batched = as_batch(visual)
    b, n, d = v.shape
    texts = _text_list(text, b, d)
    m_max = max((t.shape[0] for t in texts if t is not None), default=0)
    r = torch.full((b, n), float("nan"), dtype=torch.float32, device=v.device)
    if m_max == 0:
        return unbatch(r, batched)
    t_pad = v.new_zeros((b, m_max, d))
    valid = torch.zeros((b, m_max), dtype=torch.bool, device=v.device)
    for i, t in enumerate(texts):
        if t is not None and t.shape[0]:
            t_pad[i, : t.shape[0]] = t.to(device=v.device, dtype=v.dtype)
            valid[i, : t.shape[0]] = True
    tn = t_pad / t_pad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    # Divide the small [B, N, M] product by ||v_i|| rather than normalising all of V first.
    cos = torch.bmm(v, tn.transpose(1, 2)) / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos.masked_fill_(~valid[:, None, :], float("-inf"))
    has_text = valid.any(dim=1)
    r[has_text] = cos[has_text].amax(dim=-1).float()
    return unbatch(r, batched)


def gate(r: Tensor, alpha: float) -> Tensor:
    """Gate weights ``w = ((1 + r) / 2) ** alpha``, floored at 1e-6 before the power.

    Monotone increasing in r, w in (0, 1], alpha = 0 -> all ones, NaN relevance (no text) -> 1.
    This is the reported ``r ** alpha`` form applied to the cosine mapped affinely onto [0, 1],
    so it is defined for the negative cosines that ``r ** alpha`` cannot take.
    """
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    s = ((1.0 + r) / 2.0).clamp(min=_GATE_FLOOR, max=1.0)
    return torch.where(torch.isnan(r), torch.ones_like(s), s.pow(alpha))


def resprune_select(
    visual: Tensor,
    keep: int,
    *,
    text: Tensor | list[Tensor | None] | None = None,
    alpha: float = 0.75,
    seed: int | Tensor | None = None,
    relevance_scores: Tensor | None = None,
    max_gram_bytes: int = _DEFAULT_MAX_GRAM_BYTES,
) -> Tensor:
    """Indices of the ``keep`` tokens ResPrune keeps, in the order selected (seed first).

    visual: [N, D] or [B, N, D], any float dtype (computed in float32/float64).
    text: prompt-noun embeddings, see ``relevance``; or pass ``relevance_scores`` already
      computed with ``relevance`` (saves recomputing it when the caller also records it).
    seed: None -> largest-L2-norm token; int -> that index; Tensor [N] / [B, N] -> its argmax
      (e.g. CLS attention).
    Returns LongTensor [keep] / [B, keep]; keep >= N returns all N indices in index order.
    """
    check_keep(keep)
    v, batched = as_batch(visual)
    b, n, _ = v.shape
    if keep >= n:
        return unbatch(keep_all(b, n, v.device), batched)
    if relevance_scores is None:
        relevance_scores = relevance(v, text) if text is not None else None
    elif text is not None:
        raise ValueError("pass either text or relevance_scores, not both")
    if relevance_scores is None:
        w = torch.ones((b, n), dtype=torch.float64, device=v.device)
    else:
        rel = relevance_scores.unsqueeze(0) if relevance_scores.dim() == 1 else relevance_scores
        if rel.shape != (b, n):
            raise ValueError(f"relevance_scores must have shape [B, N] = [{b}, {n}], got {tuple(rel.shape)}")
        w = gate(rel.to(v.device), alpha).double()
    seed_idx = _seed_index(seed, v)
    idx = greedy_residual(v, keep, w, seed_idx, max_gram_bytes=max_gram_bytes)
    return unbatch(idx, batched)


def greedy_residual(
    v: Tensor, keep: int, weights: Tensor, seed_idx: Tensor, *, max_gram_bytes: int = _DEFAULT_MAX_GRAM_BYTES
) -> Tensor:
    """Weighted greedy max-residual selection as pivoted Cholesky. v [B,N,D], weights [B,N] > 0."""
    b, n, d = v.shape
    ar = torch.arange(b, device=v.device)
    if b * n * n * 4 <= max_gram_bytes:
        gram = torch.bmm(v, v.transpose(1, 2))  # the one GEMM this method costs

        def gram_row(j: Tensor) -> Tensor:
            return gram[ar, j]

        norms2 = torch.diagonal(gram, dim1=1, dim2=2)
    else:

        def gram_row(j: Tensor) -> Tensor:
            return torch.bmm(v, v[ar, j].unsqueeze(-1)).squeeze(-1)

        norms2 = (v * v).sum(dim=-1)

    resid = norms2.double()  # d_i = G_ii - sum_t L_ti^2: residual energy outside span(S)
    floor = resid * (math.sqrt(d) * torch.finfo(torch.float32).eps)
    chol = torch.zeros((b, keep, n), dtype=torch.float64, device=v.device)
    chosen = torch.zeros((b, n), dtype=torch.bool, device=v.device)
    order = torch.empty((b, keep), dtype=torch.long, device=v.device)
    for t in range(keep):
        if t == 0:
            j = seed_idx
        else:
            # Spanned tokens score w - 2 < 0: after every live token, highest gate first.
            score = torch.where(resid > floor, weights * resid, weights - 2.0)
            j = score.masked_fill_(chosen, float("-inf")).argmax(dim=-1)
        order[:, t] = j
        chosen[ar, j] = True
        row = gram_row(j).double()
        if t:
            row -= torch.bmm(chol[ar, :t, j].unsqueeze(1), chol[:, :t]).squeeze(1)
        dj = resid[ar, j]
        live = dj > floor[ar, j]
        row = torch.where(live[:, None], row / dj.clamp_min(1e-300).sqrt()[:, None], 0.0)
        chol[:, t] = row
        resid -= row * row
    return order


def _seed_index(seed: int | Tensor | None, v: Tensor) -> Tensor:
    b, n, _ = v.shape
    if seed is None:
        return v.norm(dim=-1).argmax(dim=-1)
    if isinstance(seed, Tensor):
        return scores_as_batch(seed.to(v.device), b, n, name="seed").argmax(dim=-1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be None, an int or a Tensor of scores, got {type(seed).__name__}")
    if not -n <= seed < n:
        raise ValueError(f"seed index {seed} is out of range for N = {n} tokens")
    return torch.full((b,), seed % n, dtype=torch.long, device=v.device)


def _text_list(text: Tensor | list[Tensor | None] | None, b: int, d: int) -> list[Tensor | None]:
    if text is None:
        return [None] * b
    if isinstance(text, Tensor):
        if text.dim() == 2:
            texts: list[Tensor | None] = [text] * b
        elif text.dim() == 3 and text.shape[0] == b:
            texts = list(text)
        else:
            raise ValueError(f"text must have shape [M, D] or [B, M, D] with B = {b}, got {tuple(text.shape)}")
    else:
        texts = list(text)
        if len(texts) != b:
            raise ValueError(f"text is a list of {len(texts)} tensors but the batch has {b} samples")
    for i, t in enumerate(texts):
        if t is None:
            continue
        if t.dim() != 2 or (t.shape[0] and t.shape[1] != d):
            raise ValueError(f"text[{i}] must have shape [M, {d}], got {tuple(t.shape)}")
        check_finite(f"text[{i}]", t)
    return texts
