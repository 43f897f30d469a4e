"""Faults on purpose, for the fault tests and for drills on a real cluster.

``RESPRUNE_FAULTS`` (JSON, read once per actor) lists faults; each names a ``stage``
(``text``, ``encode``, ``decode``) and one of:

- ``"fail_ids": [...]``: the stage's model call raises ``InjectedFault`` for any batch holding
  one of these ids, every time (a poisoned row: the batch is split until only it fails);
- ``"crash_once": "<marker file>"``: the first batch the stage sees, anywhere, kills its actor's
  process (``os._exit``), once: the marker file, created atomically, records that it happened.
  The marker's directory must be shared by the workers (one machine in the tests);
- ``"crash_ids": [...]``: any batch holding one of these ids kills its actor's process, every
  time (a row that segfaults or exhausts memory: retried ``ray.max_task_retries`` times, then
  the run stops);
- ``"delay_s": <seconds>``: every batch the stage sees waits this long first (a slow worker;
  keeps a fast engine's run going long enough to be interrupted mid-run).

Unset, nothing here runs. The driver forwards the variable to its workers (``runtime_env``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from functools import cache

ENV = "RESPRUNE_FAULTS"


class InjectedFault(RuntimeError):
    """Raised on purpose by ``RESPRUNE_FAULTS``."""


@cache
def _faults() -> tuple[dict, ...]:
    raw = os.environ.get(ENV)
    return tuple(json.loads(raw)) if raw else ()


def fail_if_poisoned(stage: str, ids: Iterable[str]) -> None:
    for fault in _faults():
        if fault["stage"] == stage and "fail_ids" in fault:
            hit = set(fault["fail_ids"]).intersection(ids)
            if hit:
                raise InjectedFault(f"injected fault in {stage} for id(s) {sorted(hit)}")


def crash(stage: str, ids: Iterable[str]) -> None:
    """At the start of a batch: wait if a ``delay_s`` fault for ``stage`` applies, then kill this
    process if a ``crash_once`` or ``crash_ids`` one does."""
    for fault in _faults():
        if fault["stage"] == stage and "delay_s" in fault:
            time.sleep(float(fault["delay_s"]))
        if fault["stage"] == stage and set(fault.get("crash_ids", ())).intersection(ids):
            os._exit(17)
        if fault["stage"] == stage and "crash_once" in fault:
            try:
                os.close(os.open(fault["crash_once"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            os._exit(17)
