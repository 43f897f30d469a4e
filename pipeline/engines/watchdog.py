"""Nothing waits forever on a decode engine.

The engine's start and every call to it run under a ``Watchdog``: a daemon thread that, while
one is in flight, checks once a second that it is within its bound and, once the engine exists,
that the engine can still answer (``DecodeEngine.failure``: for vLLM, its engine processes are
alive). A dead engine (its process killed: an OOM kill, a GPU Xid, a segfault), an error the
engine says is fatal (vLLM's ``EngineDeadError``), a call or a start past its bound (a stuck
engine) end the actor's process: every process the actor started is killed first (so a GPU's
memory is free), then ``os._exit``. Ray restarts the actor (a fresh engine) and retries the batch
it was running, so no row is written as an error because the engine died. An exception from a
live engine is raised to the stage as it is: a row error, split down to the failing row.

A start that raises before any engine of the run has started is most likely the configuration:
its error is raised and the run stops at once. Once an engine of the run has started (the stage
asks the run's ledger), a failed start counts as an engine failure and the actor restarts.

The bound of a call (``call_bound_s``) is ``decode_stage.call_timeout_s`` when set, else derived
from the call's work: ``CALL_BASE_S`` plus, per token of prefill and generation of each row,
``CALL_S_PER_TOKEN_GPU`` on a GPU or ``CALL_S_PER_TOKEN_CPU`` on a CPU, many times what a healthy
call takes (docs/reliability.md has the figures). A start's bound is
``decode_stage.start_timeout_s``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import psutil

from .base import DecodeEngine

log = logging.getLogger(__name__)
T = TypeVar("T")

CALL_BASE_S = 120.0  # first-call warm-up (allocator, autotuning) and scheduling noise
CALL_S_PER_TOKEN_GPU = 0.005  # LLaVA-1.5-7B on an H100, estimated: ~0.0001 s per token of work in a 64-row batch
CALL_S_PER_TOKEN_CPU = 0.25  # the tiny models here, measured: ~0.002; a 7B in fp32 on a few cores, estimated: ~0.1
POLL_S = 1.0  # how often a start or call in flight is checked
EXIT_CODE = 75  # the actor's exit status when its engine failed (EX_TEMPFAIL: retry)


def call_bound_s(work_tokens: int, on_gpu: bool, fixed_s: float | None = None) -> float:
    """Seconds an engine call may take before it counts as stuck: ``fixed_s``
    (``decode_stage.call_timeout_s``) when set, else derived from ``work_tokens`` (each row's
    prefill tokens plus ``max_new_tokens``, summed over the call's rows)."""
    if fixed_s is not None:
        return fixed_s
    return CALL_BASE_S + work_tokens * (CALL_S_PER_TOKEN_GPU if on_gpu else CALL_S_PER_TOKEN_CPU)


class Watchdog:
    """Starts and calls an engine within bounds; on a failure calls ``report(why)`` (it must
    return within seconds), kills the processes this one started and exits."""

    def __init__(self, report: Callable[[str], None], poll_s: float = POLL_S) -> None:
        self.report = report
        self.poll_s = poll_s
        self.engine: DecodeEngine | None = None
        self._lock = threading.Lock()
        self._deadline: float | None = None  # monotonic time the start or call in flight must end by
        self._what = ""  # what is in flight, for the report
        self._failing = threading.Lock()  # one failure is reported, once
        self._thread: threading.Thread | None = None

    def start(self, load: Callable[[], DecodeEngine], bound_s: float, restart_on_error: Callable[[], bool]) -> DecodeEngine:
        """``load()`` within ``bound_s`` seconds. If it raises and ``restart_on_error()``, the
        actor restarts; otherwise the error is raised."""
        with self._armed(bound_s, "the engine's start (decode_stage.start_timeout_s)"):
            try:
                self.engine = load()
            except Exception as e:
                if restart_on_error():
                    self._fail(f"the engine failed to start: {type(e).__name__}: {str(e)[:300]}")
                raise
        return self.engine

    def call(self, fn: Callable[[], T], bound_s: float) -> T:
        """``fn()`` within ``bound_s`` seconds on a live engine; an exception from a live engine is
        raised as it is."""
        assert self.engine is not None, "start the engine first"
        why = self.engine.failure()
        if why:  # it died while the actor was idle: this batch runs again on a fresh engine
            self._fail(why)
        with self._armed(bound_s, f"a {self.engine.name} engine call (decode_stage.call_timeout_s)"):
            try:
                return fn()
            except Exception as e:
                why = self.engine.failure() or self.engine.fatal(e)
                if why:
                    self._fail(why)
                raise

    @contextmanager
    def _armed(self, bound_s: float, what: str) -> Iterator[None]:
        with self._lock:
            self._deadline, self._what = time.monotonic() + bound_s, f"{what} did not finish within its bound of {bound_s:.0f} s"
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="engine-watchdog", daemon=True)
            self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._deadline = None

    def _watch(self) -> None:
        while True:  # a daemon thread: it ends with the process
            time.sleep(self.poll_s)
            with self._lock:
                deadline, what = self._deadline, self._what
            if deadline is None:
                continue
            why = self.engine.failure() if self.engine is not None else None
            if why is None and time.monotonic() > deadline:
                why = f"{what}: stuck"
            if why:
                self._fail(why)

    def _fail(self, why: str) -> None:
        """Never returns: the process exits, and Ray restarts the actor and retries its batch."""
        self._failing.acquire()  # a second failure (the other thread) waits here for the exit
        try:
            self.report(why)
        except Exception:  # noqa: BLE001 - the exit must happen whatever the report did
            log.exception("reporting the engine failure failed")
        kill_descendants()
        logging.shutdown()  # flush the report before the hard exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CODE)


def kill_descendants() -> None:
    """SIGKILL every process this one started (an engine core, its GPU workers; a stopped one
    too), so the restarted actor finds the GPU's memory free."""
    try:
        doomed = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for p in doomed:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(doomed, timeout=10)
