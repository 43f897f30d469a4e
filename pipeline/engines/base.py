"""The decode-engine interface the decode stage calls; one implementation per engine.

An engine turns rows of kept visual tokens plus a prompt into answers. It owns its model for
the actor's life and the engine-specific code; family specifics (chat template, placeholder
token, where each kept token sits, the row's payload) come from the family adapter
(``pipeline.models``: ``hf_inputs``, ``vllm_request``), so a new family touches its adapter, not
the engines. ``DecodeRequest`` is defined beside the adapters (which read it) and exported here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from pipeline.models import DecodeRequest, Generation, VisionLanguageAdapter

if TYPE_CHECKING:
    from pipeline.config import GenerationConfig


class DecodeEngine(ABC):
    """``generate`` answers a list of requests, in order, or raises; the stage then splits the
    call down to the request that fails and writes it as that row's ``decode failed: ...``."""

    name: ClassVar[str]
    # True: the stage hands the engine a whole Ray batch per call (it schedules rows itself);
    # False: the stage groups rows into padded calls of at most max_batch_tokens.
    schedules_batches: ClassVar[bool]

    def __init__(self, adapter: VisionLanguageAdapter) -> None:
        self.adapter = adapter  # prompt side: template, tokenizer, context length

    @property
    def context_length(self) -> int:
        """Tokens a sequence may take in this engine: prompt, kept visual tokens and new tokens."""
        return self.adapter.context_length

    @abstractmethod
    def generate(self, requests: list[DecodeRequest], gen: GenerationConfig) -> list[Generation]: ...

    # Health, for the watchdog (``pipeline.engines.watchdog``): an engine that can die apart from
    # its actor (a process of its own) says so here, and the actor restarts with a fresh one.
    def failure(self) -> str | None:
        """Why the engine can no longer answer (its process is gone), or None. Cheap: polled
        once a second during a call."""
        return None

    def fatal(self, error: Exception) -> str | None:
        """Why ``error``, raised by ``generate``, means the engine is dead (not the rows at fault),
        or None."""
        return None
