"""Faults on purpose, for the fault tests and for drills on a real cluster.

``RESPRUNE_FAULTS`` (JSON, read once per actor) lists faults; each names a ``stage``
(``text``, ``prepare``, ``encode``, ``decode``) and one of:

- ``"fail_ids": [...]``: the stage's model call raises ``InjectedFault`` for any batch holding
  one of these ids, every time (a poisoned row: the batch is split until only it fails);
- ``"crash_once": "<marker file>"``: the first batch the stage sees, anywhere, kills its actor's
  process (``os._exit``), once: the marker file, created atomically, records that it happened.
  The marker's directory must be shared by the workers (one machine in the tests);
- ``"crash_ids": [...]``: any batch holding one of these ids kills its actor's process, every
  time (a row that segfaults or exhausts memory: retried ``ray.max_task_retries`` times, then
  the run stops);
- ``"delay_s": <seconds>``: every batch the stage sees waits this long first (a slow worker;
  keeps a fast engine's run going long enough to be interrupted mid-run);
- ``"stall_once": "<marker file>"`` (decode): the first engine call, anywhere, hangs inside the
  watched call for ``"stall_s"`` seconds (default 3600), once: a stuck engine, for the watchdog.

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


def stall(stage: str) -> None:
    """Inside an engine call: hang if a ``stall_once`` fault for ``stage`` has not fired yet."""
    for fault in _faults():
        if fault["stage"] == stage and "stall_once" in fault and _first_time(fault["stall_once"]):
            time.sleep(float(fault.get("stall_s", 3600)))


def _first_time(marker: str) -> bool:
    """True once, anywhere the marker's directory is shared: it is created atomically."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def crash(stage: str, ids: Iterable[str]) -> None:
    """At the start of a batch: wait if a ``delay_s`` fault for ``stage`` applies, then kill this
    process if a ``crash_once`` or ``crash_ids`` one does."""
    for fault in _faults():
        if fault["stage"] == stage and "delay_s" in fault:
            time.sleep(float(fault["delay_s"]))
        if fault["stage"] == stage and set(fault.get("crash_ids", ())).intersection(ids):
            os._exit(17)
        if fault["stage"] == stage and "crash_once" in fault and _first_time(fault["crash_once"]):
            os._exit(17)
