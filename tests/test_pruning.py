"""ResPrune core and baselines against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

import pipeline.pruning.resprune as resprune_module
from pipeline.pruning import METHODS, gate, get_method, relevance, resprune_select
from pipeline.pruning.resprune import greedy_residual

F32_EPS = float(np.finfo(np.float32).eps)


def cpqr_reference(v: torch.Tensor, w: torch.Tensor, seed: int, keep: int) -> list[int]:
    """Greedy order from scipy's column-pivoted QR on sqrt(w_i) * v_i, seed forced first."""
    x = v.double().numpy()
    s = x[seed]
    resid = x - np.outer(x @ s / (s @ s), s)
    others = [i for i in range(len(x)) if i != seed]
    cols = (np.sqrt(w.double().numpy())[:, None] * resid)[others]
    _, _, piv = scipy.linalg.qr(cols.T, pivoting=True, mode="economic")
    return [seed] + [others[p] for p in piv[: keep - 1]]


def gated_residuals(x: np.ndarray, w: np.ndarray, chosen: list[int]) -> np.ndarray:
    """w_i * ||x_i - P_S x_i||^2 in float64 with explicit re-orthogonalised residuals."""
    r = x.copy()
    for j in chosen:
        q = r[j].copy()  # fixed for both passes: a second q = r[j] would be rounding noise
        nq = q @ q
        if nq <= 0:
            continue
        for _ in range(2):  # twice is enough (Kahan)
            r = r - np.outer(r @ q / nq, q)
    return w * np.einsum("nd,nd->n", r, r)


def assert_greedy_valid(v: torch.Tensor, w: torch.Tensor, order: list[int]) -> None:
    """Each pick maximises the gated residual given the picks before it, up to float32-Gram resolution."""
    x, wn = v.double().numpy(), w.double().numpy()
    assert len(set(order)) == len(order), "duplicate indices"
    tol = 4 * math.sqrt(x.shape[1]) * F32_EPS * float((wn * np.einsum("nd,nd->n", x, x)).max())
    for t in range(1, len(order)):
        g = gated_residuals(x, wn, order[:t])
        g[order[:t]] = -np.inf
        assert g[order[t]] >= g.max() - tol, f"step {t}: picked {g[order[t]]:.3e}, best {g.max():.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rng", [0, 1, 2])
def test_single_matches_cpqr_reference(dtype: torch.dtype, rng: int) -> None:
    gen = torch.Generator().manual_seed(rng)
    v = torch.randn((96, 160), generator=gen).to(dtype)
    text = torch.randn((3, 160), generator=gen)
    idx = resprune_select(v, 40, text=text, alpha=0.75)
    vf = v.float()
    w = gate(relevance(vf, text), 0.75)
    assert idx.shape == (40,) and idx.dtype == torch.long
    assert idx.tolist() == cpqr_reference(vf, w, int(vf.norm(dim=-1).argmax()), 40)


def test_batched_mixed_text_matches_per_sample_reference() -> None:
    gen = torch.Generator().manual_seed(7)
    v = torch.randn((5, 80, 128), generator=gen)
    text = [torch.randn((2, 128), generator=gen), None, torch.randn((6, 128), generator=gen), torch.zeros((0, 128)), torch.randn((1, 128), generator=gen)]
    cls = torch.rand((5, 80), generator=gen)
    idx = resprune_select(v, 30, text=text, alpha=1.0, seed=cls)
    assert idx.shape == (5, 30)
    for b in range(5):
        r = relevance(v[b], text[b]) if text[b] is not None and len(text[b]) else torch.full((80,), float("nan"))
        w = gate(r, 1.0)
        seed = int(cls[b].argmax())
        assert idx[b].tolist() == cpqr_reference(v[b], w, seed, 30)
        assert idx[b].tolist() == resprune_select(v[b], 30, text=text[b], alpha=1.0, seed=cls[b]).tolist()


def test_no_text_samples_are_ungated() -> None:
    gen = torch.Generator().manual_seed(3)
    v = torch.randn((2, 64, 96), generator=gen)
    mixed = resprune_select(v, 20, text=[torch.randn((3, 96), generator=gen), torch.zeros((0, 96))])
    plain = resprune_select(v, 20)
    assert mixed[1].tolist() == plain[1].tolist()
    assert mixed[0].tolist() != plain[0].tolist()  # guidance changed the guided sample


def test_without_seed_or_text_equals_plain_cpqr() -> None:
    gen = torch.Generator().manual_seed(11)
    v = torch.randn((70, 100), generator=gen)
    _, _, piv = scipy.linalg.qr(v.double().numpy().T, pivoting=True, mode="economic")
    assert resprune_select(v, 50).tolist() == piv[:50].tolist()


def test_int_seed_is_first_and_negative_index_wraps() -> None:
    v = torch.randn((50, 64))
    assert int(resprune_select(v, 5, seed=17)[0]) == 17
    assert int(resprune_select(v, 5, seed=-1)[0]) == 49
    with pytest.raises(ValueError, match="out of range"):
        resprune_select(v, 5, seed=50)


def test_gram_free_path_gives_same_order() -> None:
    gen = torch.Generator().manual_seed(5)
    v = torch.randn((3, 200, 64), generator=gen)
    w = gate(relevance(v, torch.randn((4, 64), generator=gen)), 0.75).double()
    seeds = v.norm(dim=-1).argmax(dim=-1)
    with_gram, _ = greedy_residual(v, 60, w, seeds)
    without, _ = greedy_residual(v, 60, w, seeds, max_gram_bytes=0)
    assert torch.equal(with_gram, without)


def test_rank_deficient_duplicates_and_zeros() -> None:
    gen = torch.Generator().manual_seed(9)
    basis = torch.randn((6, 48), generator=gen)
    v = torch.cat([basis, basis[:3] * 2.0, torch.zeros((4, 48)), basis[:2]], dim=0)  # rank 6, N = 15
    text = torch.randn((2, 48), generator=gen)
    idx = resprune_select(v, 15 - 1, text=text)
    order = idx.tolist()
    assert len(set(order)) == len(order) == 14
    rank_picks = order[:6]
    assert torch.linalg.matrix_rank(v[rank_picks].double()) == 6  # first picks span everything
    w = gate(relevance(v, text), 0.75)
    assert_greedy_valid(v, w, order)


def test_keep_larger_than_rank_and_low_rank_plus_noise_is_greedy_valid() -> None:
    gen = torch.Generator().manual_seed(2)
    v = torch.randn((150, 12), generator=gen) @ torch.randn((12, 256), generator=gen)
    v = v + 1e-3 * torch.randn((150, 256), generator=gen)
    text = torch.randn((3, 256), generator=gen)
    order = resprune_select(v, 40, text=text).tolist()
    assert_greedy_valid(v, gate(relevance(v, text), 0.75), order)


def test_keep_ge_n_returns_all() -> None:
    v = torch.randn((2, 10, 8))
    assert resprune_select(v, 10).tolist() == [list(range(10))] * 2
    assert resprune_select(v[0], 99).tolist() == list(range(10))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_inputs_raise_named_errors(bad: float) -> None:
    v = torch.randn((3, 20, 8))
    v[1, 4, 2] = bad
    kind = "NaN" if math.isnan(bad) else "inf"
    with pytest.raises(ValueError, match=rf"visual contains {kind} values \(sample 1\)"):
        resprune_select(v, 5)
    t = torch.randn((2, 8))
    t[0, 0] = bad
    with pytest.raises(ValueError, match=rf"text\[0\] contains {kind}"):
        resprune_select(torch.randn((20, 8)), 5, text=[t])


def test_argument_errors() -> None:
    v = torch.randn((20, 8))
    with pytest.raises(ValueError, match="keep must be >= 1"):
        resprune_select(v, 0)
    with pytest.raises(ValueError, match="shape"):
        resprune_select(torch.randn(8), 3)
    with pytest.raises(ValueError, match="text is a list of 1"):
        resprune_select(torch.randn((2, 20, 8)), 3, text=[torch.randn((1, 8))])
    with pytest.raises(ValueError, match="alpha"):
        gate(torch.zeros(3), -1.0)


def test_relevance_is_max_cosine() -> None:
    gen = torch.Generator().manual_seed(4)
    v, t = torch.randn((30, 16), generator=gen), torch.randn((5, 16), generator=gen)
    expected = torch.nn.functional.cosine_similarity(v[:, None, :], t[None, :, :], dim=-1).amax(dim=1)
    torch.testing.assert_close(relevance(v, t), expected)
    assert torch.isnan(relevance(v, torch.zeros((0, 16)))).all()


def test_gate_properties() -> None:
    r = torch.linspace(-1, 1, 101)
    w = gate(r, 0.75)
    assert (w > 0).all() and (w <= 1).all()
    assert (w[1:] > w[:-1]).all()  # strictly increasing above the floor
    assert torch.equal(gate(r, 0.0), torch.ones_like(r))
    assert gate(torch.tensor([float("nan")]), 0.75).item() == 1.0
    torch.testing.assert_close(gate(torch.tensor([0.5]), 2.0), torch.tensor([0.5625]))


# ---- the blocked selection against the one-row-per-step recurrence ---------------------


def recurrence_reference(v: torch.Tensor, w: torch.Tensor, seed: int, keep: int) -> list[int]:
    """The unblocked algorithm: pivoted Cholesky one row per step, float64 on the float32 Gram
    that ``greedy_residual`` forms (the same ``bmm``, so the same rounding)."""
    g = torch.bmm(v[None], v[None].transpose(1, 2))[0].double().numpy()
    n, d = v.shape
    wn = w.double().numpy()
    resid = np.diag(g).copy()
    floor = resid * (math.sqrt(d) * F32_EPS)
    chol = np.zeros((keep, n))
    chosen = np.zeros(n, dtype=bool)
    order = []
    for t in range(keep):
        if t == 0:
            j = seed
        else:
            score = np.where(resid > floor, wn * resid, wn - 2.0)
            score[chosen] = -np.inf
            j = int(score.argmax())
        order.append(j)
        chosen[j] = True
        row = g[j] - chol[:t, j] @ chol[:t]
        chol[t] = row / math.sqrt(resid[j]) if resid[j] > floor[j] else 0.0
        resid -= chol[t] * chol[t]
    return order


@pytest.fixture(
    params=[(5, 3), (16, 7), (40, 128), (None, 16)],
    ids=["cand5-block3", "cand16-block7", "cand40-block128", "all-block16"],
)
def blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[int | None, int]:
    """Small candidate sets (many blocks, most ended by the bound), or every token a candidate
    (the default below 1024 tokens) with short blocks: several completions, no bound."""
    candidates, block = request.param
    if candidates is not None:
        monkeypatch.setattr(resprune_module, "_CANDIDATES", candidates)
        monkeypatch.setattr(resprune_module, "_ALL_CANDIDATES", 0)
    monkeypatch.setattr(resprune_module, "_MAX_BLOCK", block)
    return request.param


def _cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, int, int]]:
    """name -> (v [N, D], gate weights [N], seed, keep)."""
    gen = torch.Generator().manual_seed(12)
    cases = {}
    v = torch.randn((120, 48), generator=gen)  # rank 48 < keep: the last picks by gate weight
    w = gate(relevance(v, torch.randn((3, 48), generator=gen)), 0.75)
    cases["gated, rank exhausted"] = (v, w, int(v.norm(dim=-1).argmax()), 50)
    v = torch.randn((150, 12), generator=gen) @ torch.randn((12, 256), generator=gen)
    v = v + 1e-3 * torch.randn((150, 256), generator=gen)
    w = gate(relevance(v, torch.randn((3, 256), generator=gen)), 0.75)
    cases["low rank + noise"] = (v, w, int(v.norm(dim=-1).argmax()), 40)
    v = torch.randn((90, 64), generator=gen) * torch.rand((90, 1), generator=gen)
    cases["seed is the weakest token"] = (v, torch.ones(90), int(v.norm(dim=-1).argmin()), 30)
    v = torch.randn((60, 32), generator=gen)
    v[7] = 0.0
    cases["zero seed"] = (v, gate(relevance(v, torch.randn((2, 32), generator=gen)), 1.0), 7, 25)
    return cases


@pytest.fixture(params=["full-gram", "rows-on-demand"])
def gram_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Force G formed whole (one bmm) or read row by row (GEMMs on V), whatever would pay."""
    monkeypatch.setattr(resprune_module, "_full_gram_pays", lambda *_: request.param == "full-gram")
    return request.param


@pytest.mark.parametrize("case", list(_cases()))
def test_blocked_selection_equals_the_recurrence(blocks: tuple, gram_mode: str, case: str) -> None:
    v, w, seed, keep = _cases()[case]
    order = greedy_residual(v[None], keep, w[None].double(), torch.tensor([seed]))[0][0].tolist()
    if gram_mode == "rows-on-demand" and case in ("gated, rank exhausted", "low rank + noise"):
        # Rows from separate GEMMs can round unlike the whole Gram (here at D <= 256; not at
        # D = 3584-4096 with MKL), which decides float32-resolution near-ties and which tokens
        # sit below the spanned floor: there, require greedy validity at that resolution.
        assert_greedy_valid(v, w, order)
    else:
        assert order == recurrence_reference(v, w, seed, keep)


def test_exact_ties_go_to_the_lower_index(blocks: tuple, gram_mode: str) -> None:
    # Orthogonal tokens, each twice, norms 6..1 (exact in float32): each score ties exactly
    # with the twin's until one is picked, then the twin is spanned.
    basis = torch.eye(16)[:6] * torch.arange(6, 0, -1.0)[:, None]
    v = torch.cat([basis, basis])
    expected = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # the lower of each pair by norm, then twins by index
    assert resprune_select(v, 10).tolist() == expected
    assert recurrence_reference(v, torch.ones(12), 0, 10) == expected


def test_batched_blocked_selection_equals_per_sample(blocks: tuple, gram_mode: str) -> None:
    gen = torch.Generator().manual_seed(8)
    v = torch.randn((3, 100, 128), generator=gen)
    text = [torch.randn((2, 128), generator=gen), None, torch.randn((5, 128), generator=gen)]
    idx = resprune_select(v, 45, text=text)
    for b in range(3):
        w = gate(relevance(v[b], text[b]), 0.75) if text[b] is not None else torch.ones(100)
        assert idx[b].tolist() == recurrence_reference(v[b], w, int(v[b].norm(dim=-1).argmax()), 45)


def test_full_gram_only_where_it_pays() -> None:
    pays = resprune_module._full_gram_pays
    assert pays(8, 576, 128, 1 << 30)  # LLaVA-1.5: all 576 are candidates, their block is G
    assert not pays(1, 2880, 320, 1 << 30)  # LLaVA-NeXT: 11 % of the rows
    assert not pays(1, 4096, 1365, 1 << 30)  # Qwen2.5-VL, a third kept
    assert pays(1, 4096, 2730, 1 << 30)  # two thirds kept
    assert not pays(1, 4096, 2730, 4096 * 4096 * 4 - 1)  # does not fit


# ---- baselines and registry -------------------------------------------------------------


def test_registry_has_all_methods_and_rejects_unknown() -> None:
    assert set(METHODS) == {"none", "random", "score_topk", "divprune", "resprune"}
    with pytest.raises(ValueError, match="unknown pruning method 'fastv'"):
        get_method("fastv")


@pytest.mark.parametrize("name", sorted(["random", "score_topk", "divprune", "resprune"]))
def test_every_method_shares_the_signature(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    v = torch.randn((3, 40, 32), generator=gen)
    cls = torch.rand((3, 40), generator=gen)
    rel = relevance(v, torch.randn((2, 32), generator=gen))
    idx = get_method(name)(v, 12, relevance=rel, scores=cls, alpha=0.5, rng_seed=3)
    assert idx.shape == (3, 12) and idx.dtype == torch.long
    assert all(len(set(row)) == 12 for row in idx.tolist())
    assert get_method(name)(v[0], 12, relevance=rel[0], scores=cls[0], alpha=0.5, rng_seed=3).shape == (12,)


def test_none_keeps_everything() -> None:
    assert get_method("none")(torch.randn((2, 9, 4)), 3).tolist() == [list(range(9))] * 2


def test_random_is_reproducible_per_seed() -> None:
    v = torch.randn((2, 50, 8))
    a = get_method("random")(v, 10, rng_seed=1)
    assert torch.equal(a, get_method("random")(v, 10, rng_seed=1))
    assert not torch.equal(a, get_method("random")(v, 10, rng_seed=2))


def test_score_topk_equals_topk_and_needs_scores() -> None:
    s = torch.rand((2, 30))
    idx = get_method("score_topk")(torch.randn((2, 30, 8)), 7, scores=s)
    assert torch.equal(idx, s.topk(7, dim=-1).indices)
    with pytest.raises(ValueError, match="needs per-token scores"):
        get_method("score_topk")(torch.randn((30, 8)), 7)


def test_divprune_is_greedy_max_min() -> None:
    gen = torch.Generator().manual_seed(6)
    v = torch.randn((60, 24), generator=gen)
    order = get_method("divprune")(v, 15).tolist()
    vn = torch.nn.functional.normalize(v.double(), dim=-1)
    dist = 1 - vn @ vn.T
    nearest = (dist + torch.eye(60, dtype=torch.float64) * 9).amin(dim=1)
    assert order[0] == int(nearest.argmax())
    for t in range(1, 15):
        min_to_sel = dist[:, order[:t]].amin(dim=1)
        min_to_sel[order[:t]] = -1
        assert math.isclose(float(min_to_sel[order[t]]), float(min_to_sel.max()), rel_tol=0, abs_tol=1e-6)
