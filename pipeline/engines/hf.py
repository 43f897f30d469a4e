"""The reference engine: Hugging Face ``generate`` through the family adapter, in padded batches."""

from __future__ import annotations

from pipeline.config import GenerationConfig
from pipeline.models import Generation

from .base import DecodeEngine, DecodeRequest


class HFEngine(DecodeEngine):
    name = "hf"
    schedules_batches = False  # static padded batches: the stage groups rows by length

    def generate(self, requests: list[DecodeRequest], gen: GenerationConfig) -> list[Generation]:
        return self.adapter.generate(
            [r.prompt for r in requests], [r.visual for r in requests], [r.kept_indices for r in requests],
            [r.layout for r in requests], gen,
            deepstack=[r.deepstack for r in requests] if any(r.deepstack is not None for r in requests) else None,
        )
