"""Stage 1 (CPU): clean each prompt and extract its nouns."""

from __future__ import annotations

import numpy as np

from pipeline.config import TextStageConfig
from pipeline.text import NounExtractor, clean_prompt

from .common import Batch, Stopwatch


class TextStage:
    """Adds ``nouns`` (list of str), ``extractor``, ``error`` ("missing prompt") and ``text_ms``."""

    def __init__(self, cfg: TextStageConfig) -> None:
        self.extract = NounExtractor(cfg.spacy_model, batch_size=cfg.batch_size)

    def __call__(self, batch: Batch) -> Batch:
        watch = Stopwatch()
        prompts = [p if isinstance(p, str) else "" for p in batch["prompt"]]
        errors = ["" if p.strip() else "missing prompt" for p in prompts]
        batch["nouns"] = self.extract([clean_prompt(p) for p in prompts])
        batch["extractor"] = np.array([self.extract.name] * len(prompts))
        batch["error"] = np.array(errors, dtype=object)
        batch["text_ms"] = watch.per_row_ms(errors)
        return batch
