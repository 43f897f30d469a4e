"""Stage 3 (GPU): LLM prefill + decode on the kept visual tokens and the prompt."""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from typing import Any, NamedTuple

import numpy as np
import ray
import torch

from pipeline.config import DecodeStageConfig, GenerationConfig, InputConfig, ModelConfig, TaskConfig
from pipeline.engines import DecodeRequest, load_engine
from pipeline.engines.watchdog import Watchdog, call_bound_s
from pipeline.io.storage import Location
from pipeline.models import Generation, from_wire, payload_from_bytes
from pipeline.tasks import constraint, implicit_task, parse_answer

from .common import Batch, Stopwatch, as_lists, errors_of, limit_torch_threads, map_splitting_failures, ok_rows
from .engine_failures import CALL_TIMEOUT_S, EngineRestartsExhausted, batch_key
from .faults import crash, fail_if_poisoned, stall

log = logging.getLogger(__name__)


class DecodeRow(NamedTuple):
    request: DecodeRequest
    length: int  # prefill tokens: templated prompt + kept visual tokens


class DecodeStage:
    """Drops ``visual_kept`` and ``visual_payload``; asks every task of each row on its
    selection's kept tokens and adds, one entry per task, ``task_answer`` (the generated text),
    ``task_prompt_tokens``, ``task_generated_tokens``, ``task_truncated``, and the task's errors in
    ``task_error`` (one task failing leaves the others' answers; a row none of whose tasks
    answered gets the first task's error as its ``error``); and ``decode_ms`` per image. A ``choice`` or ``json`` task's answer is constrained by the engine
    and checked here (``pipeline.tasks.parse_answer``: ``invalid answer`` when generation stopped
    first).

    The engine (``decode_stage.engine``, ``pipeline.engines``) is built once per actor. Prompts
    longer than the limit (``input.max_prompt_tokens``, else the engine's context less the row's
    kept visual tokens and ``max_new_tokens``) are rejected (``prompt too long``) or cut
    (``input.long_prompt``), the same for every engine. An engine that schedules rows itself
    (vLLM) gets the whole batch in one call, each image's tasks side by side; otherwise (HF) each
    task's rows go in length order, in calls of at most ``max_batch_tokens`` padded tokens, so one
    long prompt does not pad the whole batch.
    A call that fails is split down to the row that fails (``decode failed: ...``).

    The engine's start and every call run under a watchdog (``pipeline.engines.watchdog``): a
    dead or stuck engine ends the actor, so Ray restarts it with a fresh engine and runs the batch
    again; each such failure is recorded in ``failures`` (the run's ``EngineFailureLedger``), and
    once there have been more than ``decode_stage.max_engine_restarts`` a restarted actor loads no
    engine and fails its first batch, which stops the run."""

    def __init__(
        self, model: ModelConfig, generation: GenerationConfig, inputs: InputConfig, stage: DecodeStageConfig,
        source: Location | None = None, failures: Any = None, tasks: tuple[TaskConfig, ...] | None = None,
    ) -> None:
        limit_torch_threads(stage.num_cpus)
        self.failures = failures
        self.refusal = self._restarts_exhausted()
        if self.refusal:  # checked before the engine loads: a spent budget costs no engine start
            return
        self.watchdog = Watchdog(self._report_failure)
        self.engine_name = stage.engine
        self.batch_ids: list[str] = []
        self.max_engine_restarts = stage.max_engine_restarts
        self.engine = self.watchdog.start(lambda: load_engine(model, stage, source), stage.start_timeout_s,
                                          self._an_engine_started_before)
        if failures is not None:
            failures.engine_started.remote()  # from now on a failed start is an engine failure, not the config
        self.adapter = self.engine.adapter
        self.generation = generation
        self.inputs = inputs
        self.max_batch_tokens = stage.max_batch_tokens
        self.tasks = tasks or (implicit_task(),)
        self.max_new_tokens = [task.max_new_tokens or generation.max_new_tokens for task in self.tasks]
        self.constraints = [constraint(task) for task in self.tasks]
        self.call_timeout_s = stage.call_timeout_s

    def __call__(self, batch: Batch) -> Batch:
        if self.refusal:
            raise EngineRestartsExhausted(f"{self.refusal}; the run stops: --resume finishes it")
        self.batch_ids = [str(i) for i in batch["id"]]
        crash("decode", self.batch_ids)
        n, t = len(batch["id"]), len(self.tasks)
        errors = errors_of(batch)
        task_errors = [[str(e) for e in batch["task_error"][i]] for i in range(n)]
        watch = Stopwatch()
        truncated = [[False] * t for _ in range(n)]
        rows: dict[tuple[int, int], DecodeRow] = {}
        for i in ok_rows(errors):
            kept = [torch.as_tensor(list(k), dtype=torch.long) for k in batch["kept_indices"][i]]
            # The selections' tokens, one after another (in the encode actor's dtype: bf16 on GPUs).
            visual = from_wire(np.asarray(batch["visual_kept"][i])).float().split([len(k) for k in kept])
            payloads = [payload_from_bytes(p) for p in batch["visual_payload"][i]]
            for j, task in enumerate(self.tasks):
                s = int(batch["task_selection"][i][j])
                if task_errors[i][j] or s < 0:
                    continue
                asked = str(batch["task_prompt"][i][j])
                prompt, tokens, problem = self._fit(asked, len(visual[s]), self.max_new_tokens[j])
                if problem:
                    task_errors[i][j] = problem
                    continue
                truncated[i][j] = prompt != asked
                request = DecodeRequest(str(batch["id"][i]), prompt, visual[s], kept[s], payloads[s],
                                        self.max_new_tokens[j], self.constraints[j])
                rows[i, j] = DecodeRow(request, tokens + len(visual[s]))
        answers = [[""] * t for _ in range(n)]
        prompt_tokens = [[0] * t for _ in range(n)]
        generated = [[0] * t for _ in range(n)]
        for group in [sorted(rows)] if self.engine.schedules_batches else self._calls(rows):
            results = map_splitting_failures(self._generate, [rows[k] for k in group], "decode")
            for (i, j), res in zip(group, results, strict=True):
                if isinstance(res, str):
                    task_errors[i][j] = res
                    continue
                answers[i][j], prompt_tokens[i][j], generated[i][j] = res.text, res.prompt_tokens, res.generated_tokens
                _, task_errors[i][j] = parse_answer(self.tasks[j], res.text, res.generated_tokens, self.max_new_tokens[j])
        for i in ok_rows(errors):  # a row none of whose tasks answered is an error row (one task: its error)
            if all(task_errors[i]):
                errors[i] = task_errors[i][0]
        for key in ("visual_kept", "visual_payload"):
            batch.pop(key)
        batch["task_answer"] = answers
        batch["task_prompt_tokens"] = prompt_tokens
        batch["task_generated_tokens"] = generated
        batch["task_truncated"] = [[bool(x) and not e for x, e in zip(tr, es, strict=True)]
                                   for tr, es in zip(truncated, task_errors, strict=True)]
        batch["task_error"] = task_errors
        batch["error"] = np.array(errors, dtype=object)
        batch["decode_ms"] = watch.per_row_ms(errors)
        return as_lists(batch)

    def _fit(self, prompt: str, kept: int, new_tokens: int) -> tuple[str, int, str]:
        """``(prompt, its text tokens, "")``: the prompt to use, cut when over the limit and
        ``long_prompt: truncate``; or ``("", 0, error)``."""
        room = self.engine.context_length - kept - new_tokens
        limit = min(room, self.inputs.max_prompt_tokens or room)
        tokens = self.adapter.text_tokens(prompt)
        if tokens <= limit:
            return prompt, tokens, ""
        why = (f"input.max_prompt_tokens = {limit}" if limit == self.inputs.max_prompt_tokens else
               f"the {limit} the engine's context of {self.engine.context_length} leaves beside {kept} visual tokens "
               f"and {new_tokens} new tokens")
        if self.inputs.long_prompt == "truncate":
            cut = self.adapter.fit_prompt(prompt, limit)
            if cut is not None:
                return cut, self.adapter.text_tokens(cut), ""
        return "", 0, f"prompt too long: {tokens} tokens > {why}"

    def _calls(self, rows: dict[tuple[int, int], DecodeRow]) -> list[list[tuple[int, int]]]:
        """Padded calls per task (a call shares its task's bound and constraint), each by length."""
        calls = []
        for j in range(len(self.tasks)):
            lengths = {k: r.length for k, r in rows.items() if k[1] == j}
            calls += padded_calls(lengths, self.max_new_tokens[j], self.max_batch_tokens)
        return calls

    def _generate(self, items: list[DecodeRow]) -> list[Generation]:
        work = sum(r.length + (r.request.max_new_tokens or self.generation.max_new_tokens) for r in items)
        bound = call_bound_s(work, self.adapter.device.type == "cuda", self.call_timeout_s)
        return self.watchdog.call(lambda: self._answer(items), bound)

    def _answer(self, items: list[DecodeRow]) -> list[Generation]:
        fail_if_poisoned("decode", [r.request.id for r in items])
        stall("decode")  # a drill's stuck engine: inside the watched call
        return self.engine.generate([r.request for r in items], self.generation)

    def _restarts_exhausted(self) -> str | None:
        """Why the run's restart budget forbids another engine, or None (also when unknown)."""
        try:
            return ray.get(self.failures.exhausted.remote(), timeout=CALL_TIMEOUT_S) if self.failures is not None else None
        except Exception:  # noqa: BLE001 - an unreachable ledger must not stop a healthy actor
            log.warning("the run's engine-failure ledger did not answer; starting the engine", exc_info=True)
            return None

    def _an_engine_started_before(self) -> bool:
        """Whether an engine of this run has started (then a failed start is not the config)."""
        try:
            return self.failures is not None and ray.get(self.failures.started.remote(), timeout=CALL_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - unknown: raise the start's error, which stops the run
            return False

    def _report_failure(self, why: str) -> None:
        """Record and log (once) that this actor's engine failed, just before the actor exits."""
        context = ray.get_runtime_context() if ray.is_initialized() else None
        event = {
            "why": why, "engine": self.engine_name, "actor": context.get_actor_id() if context else None,
            "node": context.get_node_id() if context else None,
            "pid": os.getpid(), "batch": batch_key(self.batch_ids) if self.batch_ids else None, "rows": len(self.batch_ids),
            "first_id": min(self.batch_ids, default=""), "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        count = "?"
        if self.failures is not None:
            try:
                count = ray.get(self.failures.record.remote(event), timeout=CALL_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - the actor exits either way; the log still says why
                count = f"? (not recorded: {type(e).__name__})"
        batch = (f"its batch of {event['rows']} rows (first id {event['first_id']}) runs again" if self.batch_ids
                 else "it was starting: no batch was lost")
        log.error(
            "decode actor %s (pid %d, node %s): %s. The actor exits and restarts with a fresh engine (engine failure "
            "%s of this run; at most %d restarts); %s", event["actor"], event["pid"], event["node"], why, count,
            self.max_engine_restarts, batch,
        )


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
