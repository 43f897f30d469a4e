"""Model-family adapters, chosen by config or by the checkpoint's ``model_type``."""

from __future__ import annotations

from pipeline.config import ModelConfig
from pipeline.cost.flops import ModelShapes

from .base import EncodedImages, Generation, Part, VisionLanguageAdapter
from .llava import LlavaAdapter
from .tiny import resolve_model_path

ADAPTERS: dict[str, type[VisionLanguageAdapter]] = {a.family: a for a in (LlavaAdapter,)}


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


def load_adapter(cfg: ModelConfig, part: Part) -> VisionLanguageAdapter:
    path = resolve_model_path(cfg.path)
    family = detect_family(path) if cfg.family == "auto" else cfg.family
    return ADAPTERS[family](cfg, path, part)


__all__ = ["ADAPTERS", "EncodedImages", "Generation", "VisionLanguageAdapter", "detect_family", "load_adapter", "model_shapes"]
