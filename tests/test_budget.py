"""The one budget rule (pipeline.pruning.budget): a count or a prune ratio -> tokens kept."""

from __future__ import annotations

import pytest

from pipeline.pruning import budget


@pytest.mark.parametrize(
    ("n", "ratio", "kept"),
    [
        (576, 0.667, 192), (576, 0.778, 128), (576, 0.889, 64),  # the paper's LLaVA-1.5 settings
        (2880, 0.778, 640), (2880, 0.667, 960), (2880, 0.889, 320),  # LLaVA-NeXT's
        (2880, 7 / 9, 640),  # float error must not add a token
        (100, 0.0, 100), (3, 0.9, 1), (1, 0.99, 1),  # nothing pruned; never fewer than one token
        (1000, 0.5, 500), (999, 0.5, 500),  # rounded up: never more than the ratio pruned
    ],
)
def test_ratio_budget_keeps_the_rest_rounded_up(n: int, ratio: float, kept: int) -> None:
    assert budget(n, prune_ratio=ratio) == kept


def test_count_budget_is_capped_by_the_image() -> None:
    assert budget(576, keep=128) == 128
    assert budget(100, keep=128) == 100


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"keep": 4, "prune_ratio": 0.5}, {"keep": 0}, {"prune_ratio": 1.0}, {"prune_ratio": -0.1}],
)
def test_invalid_budgets_fail(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        budget(576, **kwargs)
