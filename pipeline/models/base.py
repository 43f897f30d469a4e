"""The adapter interface the stages use; one implementation per model family.

A family adapter owns every transformers call for its family, so a transformers upgrade
changes one file. The stages see plain tensors:

- ``encode(images)`` -> visual tokens in the LLM input-embedding space, per image [N_i, D],
  plus optional per-token seed scores (LLaVA: CLS attention) [N_i];
- ``embed_words(words)`` -> the LLM input embeddings of each row's words, [M_i, D];
- ``generate(prompts, visual, kept_indices, gen)`` -> answers from the kept tokens.
  ``kept_indices`` (ascending, into the image's N_i tokens) lets families whose positions
  depend on the token grid (Qwen2.5-VL's 3-D M-RoPE) place each kept token where it was.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from PIL import Image
from torch import Tensor

from pipeline.config import GenerationConfig, ModelConfig
from pipeline.cost.flops import ModelShapes

Part = Literal["vision", "language"]


@dataclass
class EncodedImages:
    features: list[Tensor]  # per image [N_i, D], float32
    seed_scores: list[Tensor] | None  # per image [N_i], or None when the family has no such score


@dataclass
class Generation:
    text: str
    prompt_tokens: int  # sequence length the LLM prefilled: text tokens + kept visual tokens
    generated_tokens: int
    token_ids: list[int]  # generated ids, up to and including EOS


class VisionLanguageAdapter(ABC):
    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # checkpoint `model_type`s this adapter serves

    def __init__(self, cfg: ModelConfig, path: str, part: Part) -> None:
        """Load what ``part`` needs from ``path``: "vision" for encoding, "language" for decoding."""
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)

    @staticmethod
    @abstractmethod
    def shapes(config: object) -> ModelShapes:
        """The family's transformers config (as loaded by ``AutoConfig``) -> the shapes the cost
        model counts FLOPs and KV bytes from."""

    @abstractmethod
    def encode(self, images: list[Image.Image]) -> EncodedImages: ...

    @abstractmethod
    def embed_words(self, words: list[list[str]]) -> list[Tensor]: ...

    @abstractmethod
    def generate(
        self, prompts: list[str], visual: list[Tensor], kept_indices: list[Tensor], gen: GenerationConfig
    ) -> list[Generation]: ...


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but this worker has no CUDA device (check the stage's num_gpus)")
    return torch.device(device)


def planned_dtype(cfg: ModelConfig, num_gpus: float) -> torch.dtype:
    """The dtype an actor reserving ``num_gpus`` will run in, decided in the driver: Ray hides
    GPUs from actors that reserve none, so `auto` resolves to cuda exactly when num_gpus > 0."""
    device = cfg.device if cfg.device != "auto" else ("cuda" if num_gpus > 0 else "cpu")
    return resolve_dtype(cfg.dtype, torch.device(device))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)
