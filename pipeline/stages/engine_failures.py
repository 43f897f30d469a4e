"""The run's record of decode-engine failures, kept by one small actor the driver owns.

A decode actor whose engine died or got stuck (``pipeline.engines.watchdog``) records it here
before it exits; Ray restarts the actor and retries the batch. A restarted actor asks first
whether the run's restart budget (``decode_stage.max_engine_restarts``) is spent: if so it loads
no engine and fails its first batch, so the run stops (exit 3, ``--resume`` finishes it) instead
of restarting engines forever. The driver reads the record into the summary and the manifest.
"""

from __future__ import annotations

import hashlib
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

MAX_EVENTS = 50  # kept in full for the manifest; counts cover every event
CALL_TIMEOUT_S = 30.0  # a dying actor waits this long at most to be recorded


class EngineRestartsExhausted(RuntimeError):
    """More engine failures than ``decode_stage.max_engine_restarts``: the run stops."""


def batch_key(ids: list[str]) -> str:
    """One batch, whichever actor and attempt runs it."""
    return hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16]


@ray.remote(num_cpus=0, max_restarts=0)
class EngineFailureLedger:
    def __init__(self, max_restarts: int) -> None:
        self.max_restarts = max_restarts
        self.events: list[dict[str, Any]] = []
        self.restarts = 0
        self.batches: set[str] = set()
        self.any_started = False

    def engine_started(self) -> None:
        self.any_started = True

    def started(self) -> bool:
        """Whether an engine of this run has started: a failed start is then an engine failure
        (a node's fault), before that most likely the configuration."""
        return self.any_started

    def record(self, event: dict[str, Any]) -> int:
        """One engine failure (``why``, ``actor``, ``node``, ``pid``, ``batch``, ``rows``); returns
        the run's failures so far."""
        self.restarts += 1
        if event.get("batch"):
            self.batches.add(event["batch"])
        if len(self.events) < MAX_EVENTS:
            self.events.append(event)
        return self.restarts

    def exhausted(self) -> str | None:
        """Why no engine may start again, or None."""
        if self.restarts <= self.max_restarts:
            return None
        last = self.events[-1]["why"] if self.events else "?"
        return (f"decode engines failed {self.restarts} times in this run, more than decode_stage.max_engine_restarts "
                f"= {self.max_restarts} (last: {last})")

    def snapshot(self) -> dict[str, Any]:
        """For the summary and the manifest: ``restarts`` (engine failures, each a fresh engine),
        ``retried_batches`` (distinct batches that ran again), ``exhausted`` (why the run may start
        no more engines, or None) and the first ``events``."""
        return {"restarts": self.restarts, "retried_batches": len(self.batches), "exhausted": self.exhausted(),
                "events": list(self.events)}


NO_FAILURES: dict[str, Any] = {"restarts": 0, "retried_batches": 0, "exhausted": None, "events": []}


def open_ledger(max_restarts: int) -> Any:
    """A ledger for one run, on the driver's node: it lives exactly as long as the driver, and a
    worker node lost mid-run (the failures it records) cannot take it along."""
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return EngineFailureLedger.options(scheduling_strategy=here).remote(max_restarts)


def close_ledger(ledger: Any) -> dict[str, Any]:
    """The ledger's snapshot, then the ledger is gone (a process running several jobs, like the
    evaluation grid, keeps no actor per job). Unreachable, it reads as nothing recorded."""
    try:
        return ray.get(ledger.snapshot.remote(), timeout=CALL_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - a report must not fail the run it reports on
        return dict(NO_FAILURES, unavailable=True)
    finally:
        ray.kill(ledger)
