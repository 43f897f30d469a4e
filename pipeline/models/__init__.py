"""Model-family adapters, chosen by config or by the checkpoint's ``model_type``.

A family is its adapter module here (``docs/adding-a-family.md``); nothing else in the package
names a family's features. Importing this package needs torch and transformers only (the GPU
benchmark's image): the config schema is for annotations, where checkpoints come from
(``sources``: storage) is imported when an adapter is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.cost.flops import ModelShapes

from .base import (
    DecodeRequest,
    EncodedImages,
    Generation,
    HFInputs,
    Part,
    Payload,
    Prepared,
    VisionLanguageAdapter,
    from_wire,
    payload_bytes,
    payload_from_bytes,
    to_wire,
)
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen3_5 import Qwen3_5Adapter
from .qwen3_vl import Qwen3VLAdapter

if TYPE_CHECKING:
    from pipeline.config import ModelConfig
    from pipeline.io.storage import Location

ADAPTERS: dict[str, type[VisionLanguageAdapter]] = {
    a.family: a for a in (LlavaAdapter, LlavaNextAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter, Qwen3_5Adapter)
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
    job's storage settings), resolved on this node (``sources``; the "image" part needs only the
    checkpoint's JSON files)."""
    from .sources import resolve_model_path

    path = resolve_model_path(source or cfg.path, metadata_only=part == "image")
    family = detect_family(path) if cfg.family == "auto" else cfg.family
    return ADAPTERS[family](cfg, path, part)


__all__ = [
    "ADAPTERS", "DecodeRequest", "EncodedImages", "Generation", "HFInputs", "Part", "Payload", "Prepared",
    "VisionLanguageAdapter", "detect_family", "from_wire", "load_adapter", "model_shapes", "payload_bytes",
    "payload_from_bytes", "to_wire", "token_counts",
]
