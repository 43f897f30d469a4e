"""Stage 1 (CPU): each task's prompt for each row, checked and cleaned, and its nouns."""

from __future__ import annotations

import numpy as np

from pipeline.config import TaskConfig, TextStageConfig
from pipeline.tasks import implicit_task, input_columns, read_text, render
from pipeline.text import NounExtractor, clean_prompt

from .common import Batch, Stopwatch, as_lists
from .faults import crash


class TextStage:
    """Replaces every column a task's prompt reads by its decoded text (null when unusable; the
    implicit task reads ``prompt``); adds per row, one entry per task in ``tasks``' order,
    ``task_prompt`` (the rendered prompt, "" on error), ``task_nouns`` (list of str) and
    ``task_error`` (``missing prompt``, ``invalid prompt``); and ``extractor``, ``error`` (the
    first task's error when no task of the row can run: then no image work is spent on it) and
    ``text_ms``."""

    def __init__(self, cfg: TextStageConfig, tasks: tuple[TaskConfig, ...] | None = None) -> None:
        self.extract = NounExtractor(cfg.spacy_model, batch_size=cfg.batch_size)
        self.tasks = tasks or (implicit_task(),)
        self.columns = input_columns(self.tasks)

    def __call__(self, batch: Batch) -> Batch:
        crash("text", [str(i) for i in batch["id"]])
        watch = Stopwatch()
        n = len(batch["id"])
        values: dict[str, list] = {}
        errors: dict[str, list] = {}
        for c in self.columns:
            values[c], errors[c] = (list(x) for x in zip(*(read_text(v) for v in batch[c]), strict=True)) if n else ([], [])
            batch[c] = np.array(values[c], dtype=object)
        prompts = [[""] * len(self.tasks) for _ in range(n)]
        task_errors = [[""] * len(self.tasks) for _ in range(n)]
        for i in range(n):
            row_values = {c: values[c][i] for c in self.columns}
            row_errors = {c: errors[c][i] for c in self.columns}
            for j, task in enumerate(self.tasks):
                prompts[i][j], task_errors[i][j] = render(task.prompt, row_values, row_errors)
        flat = [clean_prompt(p) if not e else "" for ps, es in zip(prompts, task_errors, strict=True)
                for p, e in zip(ps, es, strict=True)]
        nouns = self.extract(flat)
        t = len(self.tasks)
        batch["task_prompt"] = prompts
        batch["task_nouns"] = [nouns[i * t:(i + 1) * t] for i in range(n)]
        batch["task_error"] = task_errors
        batch["extractor"] = np.array([self.extract.name] * n)
        row_errors = [es[0] if all(es) else "" for es in task_errors]
        batch["error"] = np.array(row_errors, dtype=object)
        batch["text_ms"] = watch.per_row_ms(row_errors)
        return as_lists(batch)
