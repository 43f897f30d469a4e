from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test (and every subprocess a test starts) builds/loads tiny models in one temp cache."""
    cache = Path(os.environ.get("RESPRUNE_TEST_CACHE") or tmp_path_factory.mktemp("resprune-cache"))
    os.environ["RESPRUNE_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_llava(tiny_cache: Path) -> str:
    from pipeline.models.sources import resolve_model_path

    return resolve_model_path("tiny:llava")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def block_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A plain background with a few coloured blocks: tiles and windows of one image differ."""
    rnd = random.Random(seed)
    img = Image.new("RGB", size, tuple(rnd.randrange(256) for _ in range(3)))
    for _ in range(6):
        x, y = rnd.randrange(size[0] - 40), rnd.randrange(size[1] - 40)
        img.paste(tuple(rnd.randrange(256) for _ in range(3)), (x, y, x + 40, y + 40))
    return img


def tiny_adapters(recipe: str) -> tuple:
    """The vision and language parts of ``tiny:<recipe>`` on CPU, loaded as the stages load them."""
    from pipeline.config import ModelConfig
    from pipeline.models import load_adapter

    cfg = ModelConfig(path=f"tiny:{recipe}", device="cpu")
    return load_adapter(cfg, "vision"), load_adapter(cfg, "language")
