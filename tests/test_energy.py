"""The adaptive budget (pipeline.pruning.energy): ResPrune's energy trace and the stopping rule,
against an independent computation from scipy's column-pivoted QR.

Without text guidance and with the largest-norm seed, ResPrune's greedy is column-pivoted QR on
V^T (each step takes the token with the largest residual), so QR's R gives the reference: the
residual energy left after k picks is ||R[k:, :]||_F^2. With the gate, the same holds for the
scaled tokens sqrt(w_i) v_i (scaling a token does not change the span it adds), seeded with the
largest weighted norm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline.config import ConfigError, PruningConfig, validate_config
from pipeline.pruning import budget, energy_keep, gate, per_image_stats, relevance, resprune_select, resprune_trace
from pipeline.stages.encode import EncodedRow, prune_rows


def _tokens(n: int, d: int, seed: int) -> torch.Tensor:
    """Tokens with a shared direction and a decaying spectrum, like visual tokens: a few picks
    explain most of the energy, the rest a long tail. Tests cut below d picks: past the rank the
    greedy's order (by gate weight) and QR's are both arbitrary."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, d)
    return torch.randn((n, d), generator=gen) * scale + 0.5 * torch.randn((1, d), generator=gen)


def _cpqr_reference(v: torch.Tensor, weights: np.ndarray | None = None) -> tuple[list[int], np.ndarray]:
    """(pivots, explained) from scipy's pivoted QR of the (scaled) tokens: explained[k - 1] =
    1 - ||R[k:]||^2 / ||R||^2."""
    x = v.double().numpy()
    if weights is not None:
        x = np.sqrt(weights)[:, None] * x
    _, r, piv = scipy.linalg.qr(x.T, pivoting=True, mode="economic")
    row_energy = (r * r).sum(axis=1)
    total = row_energy.sum()
    left = total - np.cumsum(row_energy)
    explained = np.ones(x.shape[0])
    explained[: len(left)] = 1 - left / total
    return piv.tolist(), explained


# The greedy forms G = V V^T in float32 (the GEMM floor), the reference works in float64: shares
# of the energy agree to float32 resolution.
ATOL = 1e-6


def _rule(explained: np.ndarray, energy: float, min_keep: int, cap: int) -> int:
    """The stopping rule written from its definition: the smallest k in [min(min_keep, cap), cap]
    whose residual energy is at most 1 - energy of the total; else the cap."""
    for k in range(min(min_keep, cap), cap + 1):
        if 1 - explained[k - 1] <= 1 - energy + 1e-12:
            return k
    return cap


def test_trace_is_the_pivoted_qr_residual_energy() -> None:
    v = _tokens(200, 64, seed=1)
    idx, explained = resprune_trace(v, 60)
    piv, ref = _cpqr_reference(v)
    assert idx.tolist() == piv[:60]
    np.testing.assert_allclose(explained.numpy(), ref[:60], rtol=0, atol=ATOL)
    assert explained[0] < 0.9 < explained[-1]  # the level the rule tests below cut at lies inside the trace


def test_gated_trace_is_the_pivoted_qr_of_the_scaled_tokens() -> None:
    v = _tokens(150, 64, seed=2)
    text = torch.randn((3, 64), generator=torch.Generator().manual_seed(3))
    w = gate(relevance(v, text), 0.75).double().numpy()
    seed = int(np.argmax(w * (v.double().numpy() ** 2).sum(1)))  # QR's first pivot on the scaled tokens
    idx, explained = resprune_trace(v, 40, text=text, seed=seed, gated=True)
    piv, ref = _cpqr_reference(v, w)
    assert idx.tolist() == piv[:40]
    np.testing.assert_allclose(explained.numpy(), ref[:40], rtol=0, atol=ATOL)
    _, plain = resprune_trace(v, 40, text=text, seed=seed)
    assert not torch.allclose(plain, explained)  # the weighting is really applied


@pytest.mark.parametrize(
    ("energy", "min_keep", "cap"),
    [(0.9, 1, 60), (0.99, 1, 60), (0.999, 1, 60),  # the rule alone
     (0.5, 8, 60),  # the floor binds: the energy is reached before min_keep
     (0.99999, 1, 12),  # the cap binds: not reached by the cap
     (0.9, 30, 12)],  # min_keep above the cap: the cap
)
def test_stopping_rule_against_the_reference(energy: float, min_keep: int, cap: int) -> None:
    v = torch.stack([_tokens(200, 64, seed=s) for s in (1, 4, 5)])
    _, explained = resprune_trace(v, cap)
    got = energy_keep(explained, energy, min_keep).tolist()
    want = [_rule(_cpqr_reference(v[b])[1], energy, min_keep, cap) for b in range(3)]
    assert got == want
    if (energy, min_keep, cap) == (0.5, 8, 60):
        assert all(k == 8 for k in got)
    if cap == 12:
        assert all(k == 12 for k in got)


def test_picks_are_nested_so_one_greedy_serves_every_cut() -> None:
    """The first k picks do not depend on the budget, across the blocked greedy's block edges
    (N > 1024 tokens: 384 candidates, blocks of at most 128 picks)."""
    v = torch.stack([_tokens(1100, 64, seed=s) for s in (6, 7)])
    text = [torch.randn((2, 64), generator=torch.Generator().manual_seed(8)), None]
    idx, _ = resprune_trace(v, 300, text=text)
    for k in (1, 50, 128, 129, 257, 300):
        assert torch.equal(resprune_select(v, k, text=text), idx[:, :k]), k


def test_rows_of_different_token_counts_in_one_batch() -> None:
    """The encode stage's selection (prune_rows): rows grouped by token count, each capped by the
    ratio budget of its own count, each cut at its own point; an all-zero image keeps the floor."""
    counts = [180, 240, 240, 300, 180]
    rows = {i: EncodedRow(_tokens(n, 64, seed=20 + i), None, torch.zeros((0, 64)), n) for i, n in enumerate(counts)}
    rows[5] = EncodedRow(torch.zeros((240, 64)), None, torch.zeros((0, 64)), 240)
    pruning = PruningConfig(method="resprune", prune_ratio=0.8, energy=0.995, min_keep=6)
    out = prune_rows(rows, pruning, alpha=0.75)
    kept = []
    for i, row in rows.items():
        n = row.features.shape[0]
        cap = budget(n, prune_ratio=0.8)
        assert out[i].budget == cap
        if i == 5:
            assert len(out[i].kept) == 6 and out[i].energy_explained == 1.0
            continue
        piv, ref = _cpqr_reference(row.features)
        k = _rule(ref, 0.995, 6, cap)
        assert out[i].kept.tolist() == sorted(piv[:k]), i
        assert out[i].energy_explained == pytest.approx(ref[k - 1], abs=ATOL)
        kept.append(k)
    assert len(set(kept)) > 1


def test_fixed_resprune_records_the_energy_its_budget_explains() -> None:
    rows = {0: EncodedRow(_tokens(200, 64, seed=1), None, torch.zeros((0, 64)), 200)}
    out = prune_rows(rows, PruningConfig(method="resprune", keep=20), alpha=0.75)
    _, ref = _cpqr_reference(rows[0].features)
    assert len(out[0].kept) == 20 and out[0].energy_explained == pytest.approx(ref[19], abs=ATOL)
    assert prune_rows(rows, PruningConfig(method="random", keep=20), alpha=0.75)[0].energy_explained is None


@pytest.mark.parametrize(("energy", "min_keep"), [(0.0, 1), (1.0, 1), (math.nan, 1), (0.9, 0)])
def test_invalid_rule_arguments_fail(energy: float, min_keep: int) -> None:
    with pytest.raises(ValueError):
        energy_keep(torch.ones((1, 4)), energy, min_keep)


def test_config_takes_energy_for_resprune_only() -> None:
    base = {"input": {"path": "x"}, "output": {"path": "y"}, "model": {"path": "tiny:llava"}}
    cfg = validate_config({**base, "pruning": {"method": "resprune", "keep": 192, "energy": 0.99, "min_keep": 8}})
    assert cfg.pruning.describe() == "energy 0.99, 8 to keep 192"
    with pytest.raises(ConfigError, match="energy"):
        validate_config({**base, "pruning": {"method": "random", "keep": 64, "energy": 0.99}})
    with pytest.raises(ConfigError, match="min_keep"):
        validate_config({**base, "pruning": {"method": "resprune", "keep": 8, "energy": 0.99, "min_keep": 16}})
    with pytest.raises(ConfigError, match="energy"):
        validate_config({**base, "pruning": {"method": "resprune", "energy": 1.0}})


def test_per_image_stats_are_nearest_rank() -> None:
    values = list(range(1, 101))
    assert per_image_stats(values) == {"mean": 50.5, "p50": 50, "p90": 90, "min": 1, "max": 100}
    assert per_image_stats([7]) == {"mean": 7, "p50": 7, "p90": 7, "min": 7, "max": 7}
    assert per_image_stats([])["p50"] is None
    assert per_image_stats([3, 1, 2])["p50"] == int(np.percentile([3, 1, 2], 50, method="inverted_cdf"))
