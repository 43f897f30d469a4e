"""Stage 3 (GPU): LLM prefill + decode on the kept visual tokens and the prompt."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from pipeline.config import DecodeStageConfig, GenerationConfig, InputConfig, ModelConfig, StorageConfig
from pipeline.engines import DecodeRequest, load_engine
from pipeline.models import Generation

from .common import Batch, Stopwatch, errors_of, limit_torch_threads, list_column, map_splitting_failures, ok_rows
from .faults import crash, fail_if_poisoned


class DecodeRow(NamedTuple):
    request: DecodeRequest
    length: int  # prefill tokens: templated prompt + kept visual tokens


class DecodeStage:
    """Drops ``visual_kept``, ``visual_deepstack`` and ``visual_layout``; adds ``answer``, ``prompt_tokens``,
    ``generated_tokens``, ``prompt_truncated``, ``decode_ms``.

    The engine (``decode_stage.engine``, ``pipeline.engines``) is built once per actor. Prompts
    longer than the limit (``input.max_prompt_tokens``, else the engine's context less the row's
    kept visual tokens and ``max_new_tokens``) are rejected (``prompt too long``) or cut
    (``input.long_prompt``), the same for every engine. An engine that schedules rows itself
    (vLLM) gets the whole batch in one call; otherwise (HF) rows go in length order, in calls of
    at most ``max_batch_tokens`` padded tokens, so one long prompt does not pad the whole batch.
    A call that fails is split down to the row that fails (``decode failed: ...``)."""

    def __init__(
        self, model: ModelConfig, generation: GenerationConfig, inputs: InputConfig, stage: DecodeStageConfig,
        storage: StorageConfig | None = None,
    ) -> None:
        limit_torch_threads(stage.num_cpus)
        self.engine = load_engine(model, stage, storage)
        self.adapter = self.engine.adapter
        self.generation = generation
        self.inputs = inputs
        self.max_batch_tokens = stage.max_batch_tokens

    def __call__(self, batch: Batch) -> Batch:
        crash("decode", [str(i) for i in batch["id"]])
        n = len(batch["id"])
        errors = errors_of(batch)
        watch = Stopwatch()
        truncated = np.zeros(n, dtype=bool)
        rows: dict[int, DecodeRow] = {}
        for i in ok_rows(errors):
            # np.array copies: Ray hands read-only views, which torch.from_numpy warns about on every row.
            visual = torch.from_numpy(np.array(batch["visual_kept"][i], dtype=np.float32))
            prompt, tokens, problem = self._fit(str(batch["prompt"][i]), len(visual))
            if problem:
                errors[i] = problem
                continue
            truncated[i] = prompt != batch["prompt"][i]
            levels = np.array(batch["visual_deepstack"][i], dtype=np.float32)
            request = DecodeRequest(
                str(batch["id"][i]), prompt, visual, torch.as_tensor(list(batch["kept_indices"][i]), dtype=torch.long),
                [int(x) for x in batch["visual_layout"][i]],
                torch.from_numpy(levels) if levels.size else None,
            )
            rows[i] = DecodeRow(request, tokens + len(visual))
        answers, prompt_tokens, generated = [""] * n, np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        for group in [sorted(rows)] if self.engine.schedules_batches else self._calls(rows):
            results = map_splitting_failures(self._generate, [rows[i] for i in group], "decode")
            for i, res in zip(group, results, strict=True):
                if isinstance(res, str):
                    errors[i] = res
                else:
                    answers[i], prompt_tokens[i], generated[i] = res.text, res.prompt_tokens, res.generated_tokens
        batch.pop("visual_kept")
        batch.pop("visual_deepstack")
        batch.pop("visual_layout")
        batch["nouns"] = list_column(batch["nouns"])
        batch["kept_indices"] = list_column(batch["kept_indices"])
        batch["answer"] = np.array(answers, dtype=object)
        batch["prompt_tokens"] = prompt_tokens
        batch["generated_tokens"] = generated
        batch["prompt_truncated"] = truncated & np.array([not e for e in errors])
        batch["error"] = np.array(errors, dtype=object)
        batch["decode_ms"] = watch.per_row_ms(errors)
        return batch

    def _fit(self, prompt: str, kept: int) -> tuple[str, int, str]:
        """``(prompt, its text tokens, "")``: the prompt to use, cut when over the limit and
        ``long_prompt: truncate``; or ``("", 0, error)``."""
        room = self.engine.context_length - kept - self.generation.max_new_tokens
        limit = min(room, self.inputs.max_prompt_tokens or room)
        tokens = self.adapter.text_tokens(prompt)
        if tokens <= limit:
            return prompt, tokens, ""
        why = (f"input.max_prompt_tokens = {limit}" if limit == self.inputs.max_prompt_tokens else
               f"the {limit} the engine's context of {self.engine.context_length} leaves beside {kept} visual tokens "
               f"and {self.generation.max_new_tokens} new tokens")
        if self.inputs.long_prompt == "truncate":
            cut = self.adapter.fit_prompt(prompt, limit)
            if cut is not None:
                return cut, self.adapter.text_tokens(cut), ""
        return "", 0, f"prompt too long: {tokens} tokens > {why}"

    def _calls(self, rows: dict[int, DecodeRow]) -> list[list[int]]:
        return padded_calls({i: r.length for i, r in rows.items()}, self.generation.max_new_tokens,
                            self.max_batch_tokens)

    def _generate(self, items: list[DecodeRow]) -> list[Generation]:
        fail_if_poisoned("decode", [r.request.id for r in items])
        return self.engine.generate([r.request for r in items], self.generation)


def padded_calls(lengths: dict[int, int], new_tokens: int, max_batch_tokens: int) -> list[list[int]]:
    """Rows (key -> prefill length) grouped for padded generate calls: by length, each call within
    ``max_batch_tokens`` padded tokens (rows x (longest + new_tokens)); a row over it runs alone."""
    calls: list[list[int]] = []
    for i in sorted(lengths, key=lengths.__getitem__):
        width = lengths[i] + new_tokens  # the longest so far: sorted
        if calls and (len(calls[-1]) + 1) * width <= max_batch_tokens:
            calls[-1].append(i)
        else:
            calls.append([i])
    return calls
