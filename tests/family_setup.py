"""Setup the family adapter tests share: the tiny checkpoint, test images, the adapters as the
stages load them, the stock model to compare with, and rows for the HF engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from torch import Tensor

from pipeline.models import DecodeRequest, Payload

from .conftest import block_image, tiny_adapters


def family_fixtures(recipe: str, sizes: list[tuple[int, int]], stock: Callable[[str], Any]) -> tuple:
    """Module-scoped fixtures ``(path, images, adapters, stock)`` for ``tiny:<recipe>``: assign
    them to those names in the test module. ``stock(path)`` loads the reference model."""

    @pytest.fixture(scope="module")
    def path(tiny_cache) -> str:
        from pipeline.models.sources import resolve_model_path

        return resolve_model_path(f"tiny:{recipe}")

    @pytest.fixture(scope="module")
    def images() -> list:
        return [block_image(s, i) for i, s in enumerate(sizes)]

    @pytest.fixture(scope="module")
    def adapters(path: str) -> tuple:
        return tiny_adapters(recipe)

    @pytest.fixture(scope="module", name="stock")
    def stock_model(path: str) -> Any:
        return stock(path)

    return path, images, adapters, stock_model


def requests(
    prompts: list[str], visual: list[Tensor], kept: list[Tensor], payloads: list[Payload] | None = None
) -> list[DecodeRequest]:
    """One decode request per row, as the decode stage builds them (ids are the row numbers)."""
    payloads = payloads if payloads is not None else [{} for _ in prompts]
    return [DecodeRequest(str(i), *row) for i, row in enumerate(zip(prompts, visual, kept, payloads, strict=True))]
