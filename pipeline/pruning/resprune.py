"""ResPrune: text-gated greedy residual-energy selection of visual tokens.

Definition (paper, Sec. III-C/D): start from a seed token; then repeatedly pick the unselected
token i maximising ``gate(r_i) * ||v_i - P_S v_i||^2``, where ``P_S`` projects onto the span of
the tokens chosen so far and ``r_i`` is the token's text relevance.

Implementation: greedy max-residual Gram-Schmidt is exactly pivoted (partial) Cholesky on the
Gram matrix ``G = V V^T`` (see ``shared/notes/resprune-method.md``), computed blocked so that
nearly all of its work is GEMM (``_greedy_one``): a block picks up to ``_MAX_BLOCK`` tokens among
the best-scoring candidates using only their small Schur complement, then one GEMM gives the
picks' rows of the Cholesky factor ``L`` over all N tokens. The picks are those of the
one-row-per-step recurrence (whose per-step GEMV over the growing ``L`` is memory-bound and made
keeping a third of 4096 tokens cost 3x the Gram GEMM). ``G`` itself is either formed with one
batched GEMM or, when only a few of its rows are needed (keep small against N) or it would not
fit in ``max_gram_bytes``, read row by row: the picks' rows and the candidates' block, each a
GEMM on ``V`` (no N x N buffer).

Precision: ``G`` is formed in float32 (the GEMM floor); the recurrence (``L`` and the residual
energies) runs in float64 because it subtracts from ``G_ii ~ ||v_i||^2`` and float32 would turn
small residuals into rounding noise. Residuals below ``sqrt(D) * eps32 * ||v_i||^2`` are below
what a float32 Gram can resolve: such tokens count as already spanned (rank exhausted) and are
only picked once nothing else is left, highest gate weight first.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .common import as_batch, check_finite, check_keep, keep_all, scores_as_batch, unbatch

# The gate maps cosine r in [-1, 1] to s = (1 + r) / 2 in [0, 1], then w = s ** alpha.
# The floor keeps w > 0 at r = -1 so no token is ever made unselectable by the gate alone.
_GATE_FLOOR = 1e-6
_DEFAULT_MAX_GRAM_BYTES = 1 << 30
# Blocked selection (``_greedy_one``): candidates a block picks from, picks per block at most.
# 384 measured best at N = 4096, keep 1365 (256 and 512-1024 were 5-20 % slower overall). Up to
# _ALL_CANDIDATES tokens, all are candidates: LLaVA-1.5's 576 then take one block of 128 picks.
_CANDIDATES = 384
_ALL_CANDIDATES = 1024
_MAX_BLOCK = 128
# Gram rows on demand: the diagonal comes from GEMMs on chunks of this many tokens.
_DIAG_CHUNK = 32


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
    w, seed_idx = _weights_and_seed(v, text, alpha, seed, relevance_scores)
    idx, _ = greedy_residual(v, keep, w, seed_idx, max_gram_bytes=max_gram_bytes)
    return unbatch(idx, batched)


def resprune_trace(
    visual: Tensor,
    keep: int,
    *,
    text: Tensor | list[Tensor | None] | None = None,
    alpha: float = 0.75,
    seed: int | Tensor | None = None,
    relevance_scores: Tensor | None = None,
    gated: bool = False,
    max_gram_bytes: int = _DEFAULT_MAX_GRAM_BYTES,
) -> tuple[Tensor, Tensor]:
    """``resprune_select``'s picks with the energy each prefix of them explains.

    Runs the greedy to ``min(keep, N)`` picks (even when that is every token: the order is what
    an adaptive budget cuts). Returns ``(indices, explained)``: LongTensor [B, K] / [K] in the
    order selected, and float64 [B, K] / [K] where ``explained[..., k - 1]`` is the share of the
    image's token energy inside the span of the first k picks (``pipeline.pruning.energy``):
    ``1 - sum_i w_i ||v_i - P_k v_i||^2 / sum_i w_i ||v_i||^2`` over all N tokens, with w = 1
    (``gated=False``) or the text gate's weights (``gated=True``). Non-decreasing in k; 1 once
    the picks span every token. Costs one GEMM of the last block's rows over ``resprune_select``.
    """
    check_keep(keep)
    v, batched = as_batch(visual)
    keep = min(keep, v.shape[1])
    w, seed_idx = _weights_and_seed(v, text, alpha, seed, relevance_scores)
    idx, traces = greedy_residual(v, keep, w, seed_idx, max_gram_bytes=max_gram_bytes, trace=True)
    trace = traces[1] if gated else traces[0]
    total, gain = trace[:, :1], trace[:, 1:]
    # An all-zero image has nothing to explain: every prefix explains all of it.
    explained = torch.where(total > 0, gain.cumsum(-1) / total.clamp_min(1e-300), torch.ones_like(gain))
    return unbatch(idx, batched), unbatch(explained.clamp_(0.0, 1.0), batched)


def _weights_and_seed(
    v: Tensor, text: Tensor | list[Tensor | None] | None, alpha: float, seed: int | Tensor | None,
    relevance_scores: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Gate weights [B, N] float64 (ones without text) and seed indices [B]."""
    b, n, _ = v.shape
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
    return w, _seed_index(seed, v)


def greedy_residual(
    v: Tensor, keep: int, weights: Tensor, seed_idx: Tensor, *, max_gram_bytes: int = _DEFAULT_MAX_GRAM_BYTES,
    trace: bool = False,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Weighted greedy max-residual selection as pivoted Cholesky. v [B,N,D], weights [B,N] > 0.

    Returns the picks [B, keep] and, with ``trace``, the energy traces plain and weighted (float64
    [B, keep + 1] each): column 0 the total ``sum_i G_ii`` (``sum_i w_i G_ii``), column t + 1 pick
    t's gain ``sum_i L_ti^2`` (``sum_i w_i L_ti^2``) for its Cholesky row ``L_t``, the drop it causes
    in the residual energy. Both from the greedy's own G, so they agree to rounding."""
    b, n, d = v.shape
    gram = torch.bmm(v, v.transpose(1, 2)) if _full_gram_pays(b, n, keep, max_gram_bytes) else None
    chol_t = torch.zeros((n, keep), dtype=torch.float64, device=v.device)  # L^T, reused by every sample
    gains = torch.zeros((2, b, keep + 1), dtype=torch.float64, device=v.device) if trace else None
    order = [
        _greedy_one(v[i], None if gram is None else gram[i], keep, weights[i].double(), int(seed_idx[i]), chol_t,
                    None if gains is None else gains[:, i])
        for i in range(b)
    ]
    idx = torch.tensor(order, dtype=torch.long, device=v.device)
    return idx, None if gains is None else (gains[0], gains[1])


def _full_gram_pays(b: int, n: int, keep: int, max_gram_bytes: int) -> bool:
    """Whether to form all of ``G`` (one batched GEMM) rather than the rows the selection reads.

    Rows on demand cost, in units of D multiply-adds per sample: the first candidates' block
    (m^2), the picks' rows (keep * N) and the rows of tokens that join the candidates later
    (about 2 per pick, times m). Those are skinny GEMMs, ~0.6 of the full GEMM's rate on CPU.
    Measured at N = 4096: full Gram better from keep ~ N / 2; rows 3x cheaper at keep = N / 8.
    """
    if b * n * n * 4 > max_gram_bytes:
        return False
    m = _num_candidates(n)
    return m * m + keep * n + 2 * keep * m > 0.6 * n * n


def _num_candidates(n: int) -> int:
    return n if n <= _ALL_CANDIDATES else min(_CANDIDATES, n)


def _gram_diagonal(x: Tensor) -> Tensor:
    """``diag(x x^T)`` from GEMMs on chunks of tokens (one batched call), not a sum of squares:
    like the rows, it then rounds as the full Gram does (with MKL at D = 1024-4096: bit for bit),
    so both paths pick the same tokens even at the float32-resolution near-ties that random
    576-token sets already have."""
    n, d = x.shape
    full = n - n % _DIAG_CHUNK
    blocks = x[:full].reshape(-1, _DIAG_CHUNK, d)
    parts = [torch.diagonal(torch.bmm(blocks, blocks.transpose(1, 2)), dim1=1, dim2=2).reshape(-1)]
    if full < n:
        parts.append(torch.diagonal(x[full:] @ x[full:].T))
    return torch.cat(parts)


def _greedy_one(
    x: Tensor, g: Tensor | None, keep: int, w: Tensor, seed: int, chol_t: Tensor, gains: Tensor | None = None
) -> list[int]:
    """One sample: the first ``keep`` pivots of gated pivoted Cholesky on ``G = x x^T``, in order.
    ``gains`` ([2, keep + 1], zeros): filled with the total energy ``sum_i G_ii`` and ``sum_i w_i
    G_ii`` (column 0) and each pick's row energy ``sum_i L_ti^2`` and ``sum_i w_i L_ti^2`` (the
    last block's rows are then computed too; picks after the rank is exhausted, and a zero seed,
    gain nothing).

    The pivots are those of the recurrence "pick j = argmax score; row ``L_t = (G_j - L_{<t}^T
    L_{<t,j}) / sqrt(d_j)``; ``d -= L_t^2``", computed by blocks:

    * A block starts with exact residuals ``d`` for every token. Its candidates ``A`` are the
      ``m`` best scores (``_num_candidates``); ``bound`` is the best score outside ``A``. Scores
      only ever decrease, so no token outside ``A`` can score above ``bound`` later in the block.
    * The recurrence then runs on ``S = G[A, A] - L[:, A]^T L[:, A]`` (the Schur complement on
      ``A``, m x m, in numpy: microseconds per step). A pick scoring above ``bound`` is the
      argmax over all N tokens; the block ends at the first step where that is not certain
      (the next block decides it from exact residuals), or after ``_MAX_BLOCK`` picks.
    * The q picks' full rows: the Schur rows at the block start, ``W = G[P] - L[:, P]^T L``
      (one GEMM), then the q x q lower triangle ``T`` of ``L[block, P]`` (known from the small
      problem, diagonal sqrt(d_j)) solved away: ``T rows = W``. Then ``d`` for every token.
    * ``S`` is carried to the next block (minus the new rows' outer product): a token keeps its
      slot while it stays a candidate; only newcomers cost a GEMM against ``L``.

    The first pick of a block is the argmax over all tokens (or the seed); ties go to the lower
    index, as ``argmax`` does. Everything after ``G`` is float64 and is the recurrence's own
    arithmetic, its sums split (block start + in-block) and ordered differently: differences of
    order 1e-16 relative, far below the float32 resolution at which ``G`` decides near-ties.
    No precision is traded for speed (float32 ``L`` would halve the traffic but move its
    rounding from 1e-16 to the 1e-7 of ``G`` itself, reordering near-ties).
    """
    n, dim = x.shape
    dev = x.device
    if g is None:  # rows of G on demand, each a GEMM on x

        def gram(rows: Tensor, cols: Tensor | None = None) -> Tensor:
            if cols is None:  # all columns: x @ x_rows^T streams x once (1.4x faster on MKL)
                return (x @ x.index_select(0, rows).T).T
            return x.index_select(0, rows) @ x.index_select(0, cols).T

        resid = _gram_diagonal(x).double()
    else:

        def gram(rows: Tensor, cols: Tensor | None = None) -> Tensor:
            r = g.index_select(0, rows)
            return r if cols is None else r.index_select(1, cols)

        resid = torch.diagonal(g).to(torch.float64, copy=True)  # a copy even when g is float64
    # resid: d_i = G_ii - sum_t L_ti^2, residual energy outside span(S).
    floor = resid * (math.sqrt(dim) * torch.finfo(torch.float32).eps)
    if gains is not None:
        gains[0, 0] = resid.sum()
        gains[1, 0] = w @ resid
    spanned_score = w - 2.0  # spanned tokens score w - 2 < 0: after every live token, highest gate first
    chosen = torch.zeros(n, dtype=torch.bool, device=dev)
    order: list[int] = []
    m = _num_candidates(n)
    slots = np.empty(0, dtype=np.int64)  # the tokens whose rows of S ``schur`` holds
    schur = torch.empty((0, 0), dtype=torch.float64, device=dev)
    t = 0
    while t < keep:
        score = torch.where(resid > floor, w * resid, spanned_score).masked_fill_(chosen, float("-inf"))
        j = seed if t == 0 else int(score.argmax())
        if not resid[j] > floor[j]:
            if t:  # nothing live is left: the rest by gate weight, ties to the lower index (as argmax)
                rest = (~chosen).nonzero().squeeze(1)
                rest = rest[torch.sort(spanned_score[rest], descending=True, stable=True).indices]
                order += rest[: keep - t].tolist()
                break
            chol_t[:, 0] = 0.0  # a zero seed spans nothing
            chosen[j] = True
            order.append(j)
            t = 1
            continue
        # A: the top m, with j (the seed, or the first of tied maxima) among them.
        if n - t <= m:
            cand, bound = (~chosen).nonzero().squeeze(1), -math.inf
        else:
            top = score.topk(m + 1)
            cand, bound = top.indices[:-1], float(top.values[-1])
            if not bool((cand == j).any()):
                cand, bound = torch.cat([cand[:-1], cand.new_tensor([j])]), float(top.values[-2])
        a_idx = cand.cpu().numpy()
        if not len(slots):
            slots = a_idx.copy()
            slots_t = torch.from_numpy(slots).to(dev)
            schur = gram(slots_t, slots_t).double()
            if t:
                l_s = chol_t[:, :t].index_select(0, slots_t)
                schur.addmm_(l_s, l_s.T, alpha=-1.0)
            fresh = np.empty(0, dtype=np.int64)
        else:  # newcomers take the slots of tokens that left A
            incoming = a_idx[~np.isin(a_idx, slots)]
            fresh = np.flatnonzero(~np.isin(slots, a_idx))[: len(incoming)]
            slots[fresh] = incoming
            slots_t = torch.from_numpy(slots).to(dev)
        if len(fresh):
            fresh_t = torch.from_numpy(fresh).to(dev)
            cross = gram(slots_t[fresh_t], slots_t).double()
            if t:
                l_s = chol_t[:, :t].index_select(0, slots_t)
                cross = torch.addmm(cross, l_s[fresh_t], l_s.T, alpha=-1.0)
            schur[fresh_t] = cross
            schur[:, fresh_t] = cross.T
        # The small problem, on the slots; those not in A (chosen, or dropped) score -inf.
        s_np = schur.cpu().numpy()
        out = ~np.isin(slots, a_idx)
        d_a = resid[slots_t].cpu().numpy()
        d_a[out] = -math.inf
        f_a = floor[slots_t].cpu().numpy()
        w_a = w[slots_t].cpu().numpy()
        sw_a = spanned_score[slots_t].cpu().numpy()
        sw_a[out] = -math.inf
        steps = min(_MAX_BLOCK, keep - t)
        l_loc = np.zeros((steps, len(slots)))  # L[t + s, slots]
        sc = np.empty(len(slots))
        picks: list[int] = []  # slot positions
        sqrt_d: list[float] = []
        p = int(np.flatnonzero(slots == j)[0])
        for s in range(steps):
            if s:
                # w * d is the score of every live token (-inf out of A); when its argmax is
                # live it is the argmax of the scores proper, as spanned tokens score < 0.
                np.multiply(w_a, d_a, out=sc)
                p = int(sc.argmax())
                if not d_a[p] > f_a[p]:
                    sc = np.where(d_a > f_a, sc, sw_a)
                    p = int(sc.argmax())
                if not (sc[p] > bound and sc[p] >= 0.0):
                    break  # not certainly the argmax over all tokens (or not live): next block
                if np.count_nonzero(sc == sc[p]) > 1:  # tied: the lowest token index, as argmax
                    tied = (sc == sc[p]).nonzero()[0]
                    p = int(tied[slots[tied].argmin()])
            root_d = math.sqrt(d_a[p])
            row = s_np[p] - l_loc[:s, p] @ l_loc[:s] if s else s_np[p].copy()
            row /= root_d
            l_loc[s] = row
            d_a -= row * row
            d_a[p] = -math.inf  # chosen: scores -inf from now on
            sw_a[p] = -math.inf
            picks.append(p)
            sqrt_d.append(root_d)
        order += slots[picks].tolist()
        q = len(picks)
        if t + q == keep and gains is None:
            break
        # The picks' full rows: W = G[P] - L[:t, P]^T L[:t] (one GEMM), then T rows = W solved
        # by substitution, row a = (W_a - sum_{c<a} T_ac row_c) / sqrt(d_a): the recurrence.
        tri = np.tril(l_loc[:q, picks].T, -1)
        np.fill_diagonal(tri, sqrt_d)
        piv = slots_t[torch.tensor(picks, device=dev)]
        # MKL's float64 GEMM runs up to 2x slower when the row count is not a multiple of 4:
        # pad with copies of the last pick (their rows are dropped).
        piv_pad = torch.cat([piv, piv[-1:].expand(-q % 4)])
        rows = gram(piv_pad).double()
        if t:
            rows = torch.addmm(rows, chol_t[:, :t].index_select(0, piv_pad), chol_t[:, :t].T, alpha=-1.0)
        new_t = chol_t[:, t : t + q]  # L^T of the new rows
        new_t.copy_(torch.linalg.solve_triangular(torch.from_numpy(tri).to(dev), rows[:q], upper=False).T)
        row_energy = new_t * new_t  # [N, q]: L_ti^2
        resid -= row_energy.sum(dim=1)
        if gains is not None:
            gains[0, t + 1 : t + q + 1] = row_energy.sum(dim=0)
            gains[1, t + 1 : t + q + 1] = w @ row_energy
            if t + q == keep:
                break
        rows_s = new_t.index_select(0, slots_t)
        schur.addmm_(rows_s, rows_s.T, alpha=-1.0)  # S up to step t + q
        chosen[piv] = True
        t += q
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
