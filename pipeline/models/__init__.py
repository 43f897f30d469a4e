"""Model-family adapters, chosen by config or by the checkpoint's ``model_type``."""

from __future__ import annotations

from pipeline.config import ModelConfig
from pipeline.cost.flops import ModelShapes
from pipeline.io.storage import Location

from .base import EncodedImages, Generation, Part, VisionLanguageAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen3_vl import Qwen3VLAdapter
from .sources import resolve_model_path

ADAPTERS: dict[str, type[VisionLanguageAdapter]] = {
    a.family: a for a in (LlavaAdapter, LlavaNextAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter)
}


def detect_family(path: str) -> str:
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(path).model_type
    for family, adapter in ADAPTERS.items():
        if model_type in adapter.model_types:
            return family
    raise ValueError(f"checkpoint {path!r} has model_type {model_type!r}; supported families: {', '.join(ADAPTERS)}")


def model_shapes(path: str, family: str = "auto") -> ModelShapes:
    """Shapes for FLOP/KV counts, read from the checkpoint's own config (only config.json is read)."""
    from transformers import AutoConfig

    family = detect_family(path) if family == "auto" else family
    return ADAPTERS[family].shapes(AutoConfig.from_pretrained(path))


def token_counts(path: str, cfg: ModelConfig, width: int, height: int, family: str = "auto") -> tuple[int, int]:
    """``(visual tokens in, encoder patches)`` of a ``width`` x ``height`` image, from the
    checkpoint's config alone (see ``VisionLanguageAdapter.token_counts``)."""
    family = detect_family(path) if family == "auto" else family
    return ADAPTERS[family].token_counts(path, cfg, width, height)


def load_adapter(cfg: ModelConfig, part: Part, source: Location | None = None) -> VisionLanguageAdapter:
    """The family adapter for ``part`` of ``cfg.path`` (``source``: that path located with the
    job's storage settings), resolved on this node (``sources``)."""
    path = resolve_model_path(source or cfg.path)
    family = detect_family(path) if cfg.family == "auto" else cfg.family
    return ADAPTERS[family](cfg, path, part)


__all__ = [
    "ADAPTERS", "EncodedImages", "Generation", "VisionLanguageAdapter", "detect_family", "load_adapter", "model_shapes",
    "resolve_model_path", "token_counts",
]
