from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test (and every subprocess a test starts) builds/loads tiny models in one temp cache."""
    cache = Path(os.environ.get("RESPRUNE_TEST_CACHE") or tmp_path_factory.mktemp("resprune-cache"))
    os.environ["RESPRUNE_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_llava(tiny_cache: Path) -> str:
    from pipeline.models.tiny import resolve_model_path

    return resolve_model_path("tiny:llava")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
