"""Decode engines behind one interface (``DecodeEngine``), one registry entry each
(``pipeline.engines.registry``): ``hf`` (Hugging Face ``generate``, the reference) and ``vllm``
(continuous batching, paged KV cache; production). The decode stage calls ``load_engine`` once per
actor; the driver calls ``engine_environment`` once per job to learn where the engine's actors run
and which version they run.

The names below are imported on first use: ``pipeline.config`` reads the registry, so importing
this package must not import torch, the models or the config itself."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .registry import EngineSpec, OwnInterpreter, engine_names, engine_spec, register

if TYPE_CHECKING:
    from pipeline.config import DecodeStageConfig, ModelConfig
    from pipeline.io.storage import Location

    from .base import DecodeEngine, DecodeRequest
    from .environment import EngineEnvironment, engine_environment

_LAZY = {"DecodeEngine": ".base", "DecodeRequest": ".base", "EngineEnvironment": ".environment",
         "engine_environment": ".environment"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_engine(model: ModelConfig, stage: DecodeStageConfig, source: Location | None = None) -> DecodeEngine:
    """The configured engine with its model loaded, for the life of a decode actor."""
    from pipeline.models import load_adapter

    spec = engine_spec(stage.engine)
    engine_class = spec.load_class()  # before the model: an engine missing from this interpreter fails fast
    adapter = load_adapter(model, spec.adapter_part, source)
    return engine_class(adapter, stage) if spec.takes_stage else engine_class(adapter)


__all__ = ["DecodeEngine", "DecodeRequest", "EngineEnvironment", "EngineSpec", "OwnInterpreter", "engine_environment",
           "engine_names", "engine_spec", "load_engine", "register"]
