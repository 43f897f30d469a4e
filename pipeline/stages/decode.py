"""Stage 3 (GPU): LLM prefill + decode on the kept visual tokens and the prompt."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import GenerationConfig, ModelConfig, StageConfig
from pipeline.models import Generation, load_adapter

from .common import Batch, Stopwatch, errors_of, limit_torch_threads, list_column, map_with_row_fallback, ok_rows


class DecodeStage:
    """Drops ``visual_kept`` and ``visual_layout``; adds ``answer``, ``prompt_tokens``,
    ``generated_tokens``, ``decode_ms``."""

    def __init__(self, model: ModelConfig, generation: GenerationConfig, stage: StageConfig) -> None:
        limit_torch_threads(stage.num_cpus)
        self.adapter = load_adapter(model, "language")
        self.generation = generation

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["id"])
        errors = errors_of(batch)
        watch = Stopwatch()
        rows = ok_rows(errors)
        items = [
            # np.array copies: Ray hands read-only views, which torch.from_numpy warns about on every row.
            (str(batch["prompt"][i]), torch.from_numpy(np.array(batch["visual_kept"][i], dtype=np.float32)),
             torch.as_tensor(list(batch["kept_indices"][i]), dtype=torch.long),
             [int(x) for x in batch["visual_layout"][i]])
            for i in rows
        ]
        results = map_with_row_fallback(self._generate, items, "decode")
        answers, prompt_tokens, generated = [""] * n, np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        for i, res in zip(rows, results, strict=True):
            if isinstance(res, str):
                errors[i] = res
            else:
                answers[i], prompt_tokens[i], generated[i] = res.text, res.prompt_tokens, res.generated_tokens
        batch.pop("visual_kept")
        batch.pop("visual_layout")
        batch["nouns"] = list_column(batch["nouns"])
        batch["kept_indices"] = list_column(batch["kept_indices"])
        batch["answer"] = np.array(answers, dtype=object)
        batch["prompt_tokens"] = prompt_tokens
        batch["generated_tokens"] = generated
        batch["error"] = np.array(errors, dtype=object)
        batch["decode_ms"] = watch.per_row_ms(errors)
        return batch

    def _generate(self, items: list[tuple[str, torch.Tensor, torch.Tensor, list[int]]]) -> list[Generation]:
        prompts, visual, kept, layouts = (list(x) for x in zip(*items, strict=True))
        return self.adapter.generate(prompts, visual, kept, layouts, self.generation)
