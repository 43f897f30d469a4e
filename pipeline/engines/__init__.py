"""Decode engines behind one interface (``DecodeEngine``): ``hf`` (Hugging Face ``generate``, the
reference) and ``vllm`` (continuous batching, paged KV cache; production). The decode stage
calls ``load_engine`` once per actor; the driver calls ``engine_environment`` once per job to
learn where the engine's actors run and which version they run."""

from __future__ import annotations

from pipeline.config import DecodeStageConfig, ModelConfig
from pipeline.io.storage import Location
from pipeline.models import load_adapter

from .base import DecodeEngine, DecodeRequest
from .environment import EngineEnvironment, engine_environment


def load_engine(model: ModelConfig, stage: DecodeStageConfig, source: Location | None = None) -> DecodeEngine:
    """The configured engine with its model loaded, for the life of a decode actor."""
    if stage.engine == "vllm":
        from .vllm_engine import VLLMEngine  # imports vllm: only in the environment that has it

        return VLLMEngine(load_adapter(model, "prompt", source), stage)
    from .hf import HFEngine

    return HFEngine(load_adapter(model, "language", source))


__all__ = ["DecodeEngine", "DecodeRequest", "EngineEnvironment", "engine_environment", "load_engine"]
