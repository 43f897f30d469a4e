"""Stage 1 (CPU): check and clean each prompt, extract its nouns."""

from __future__ import annotations

import numpy as np

from pipeline.config import TextStageConfig
from pipeline.text import NounExtractor, clean_prompt

from .common import Batch, Stopwatch
from .faults import crash


def read_prompt(value: object) -> tuple[str | None, str]:
    """``(prompt, error)``: a string as is; bytes decoded as UTF-8 (a prompt column stored as
    binary; null when they are not UTF-8: ``invalid prompt``); null, empty or whitespace-only
    -> ``missing prompt`` (the text kept as read)."""
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"invalid prompt: not valid UTF-8 ({e.reason} at byte {e.start})"
    if not isinstance(value, str):
        return None, "missing prompt"
    return value, "" if value.strip() else "missing prompt"


class TextStage:
    """Replaces ``prompt`` by the decoded text (null when unusable); adds ``nouns`` (list of str),
    ``extractor``, ``error`` (``missing prompt``, ``invalid prompt``) and ``text_ms``."""

    def __init__(self, cfg: TextStageConfig) -> None:
        self.extract = NounExtractor(cfg.spacy_model, batch_size=cfg.batch_size)

    def __call__(self, batch: Batch) -> Batch:
        crash("text", [str(i) for i in batch["id"]])
        watch = Stopwatch()
        prompts, errors = zip(*(read_prompt(p) for p in batch["prompt"]), strict=True) if len(batch["prompt"]) else ((), ())
        batch["prompt"] = np.array(prompts, dtype=object)
        batch["nouns"] = self.extract([clean_prompt(p) if not e else "" for p, e in zip(prompts, errors, strict=True)])
        batch["extractor"] = np.array([self.extract.name] * len(prompts))
        batch["error"] = np.array(errors, dtype=object)
        batch["text_ms"] = watch.per_row_ms(errors)
        return batch
