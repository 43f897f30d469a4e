"""Step 4 of a run, ``report``: the summary and the manifest, both built from one ``JobSummary``
read back from what was written. Each summary field says once, in its metadata, where it goes in
the manifest (``pipeline.io.manifest``), so no field is listed twice."""

from __future__ import annotations

import heapq
import json
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from pipeline.io.inputs import InputPlan
from pipeline.io.schema import COST_COLUMNS, STAGE_TIME_COLUMNS
from pipeline.io.storage import Location
from pipeline.pruning import per_image_stats
from pipeline.quality.scoring import is_caption, label_scores
from pipeline.tasks import TaskSpec, one_answer
from pipeline.tiny.scoring import task_scores

EXAMPLES = 5  # rows the summary shows
CAPTION_EXAMPLES = 3  # and caption rows beyond them


def _in(section: str, key: str, default: Any = MISSING, factory: Any = MISSING, when_set: bool = False) -> Any:
    """A summary field that the manifest also holds, as ``manifest[section][key]`` (``when_set``:
    only when it holds something, so runs without the feature keep their manifest's shape)."""
    return field(default=default, default_factory=factory, metadata={"manifest": (section, key), "when_set": when_set})


@dataclass
class JobSummary:
    input_rows: int = _in("rows", "input")  # rows in the input files
    expected_rows: int = _in("rows", "expected")  # rows the output must hold: input rows less those dropped by id
    output_rows: int = _in("rows", "output")  # rows in the output, every attempt of the run included
    ok_rows: int = _in("rows", "ok")
    error_rows: int = _in("rows", "error")
    errors_by_kind: dict[str, int] = _in("rows", "errors_by_kind", factory=dict)
    dropped: dict[str, int] = _in("rows", "dropped", factory=dict)  # input rows dropped by id, by reason
    skipped_already_done: int = _in("rows", "skipped_already_done", 0)  # rows an earlier attempt committed (resume)
    written_this_attempt: int = _in("rows", "written_this_attempt", 0)
    missing_ids: int = _in("rows", "missing_ids", 0)  # expected ids absent from the output (0 for a complete run)
    duplicate_ids: int = _in("rows", "duplicate_ids", 0)  # output rows beyond the first of their id (always 0, checked)
    truncated_prompts: int = _in("rows", "truncated_prompts", 0)
    extractors: dict[str, int] = field(default_factory=dict)
    mean_visual_tokens_in: float = _in("visual_tokens", "mean_in", 0.0)
    mean_visual_tokens_kept: float = _in("visual_tokens", "mean_kept", 0.0)
    # Per answered image (pipeline.pruning.per_image_stats): mean, p50, p90, min, max. With an
    # adaptive budget (pruning.energy) this is what the corpus actually kept.
    visual_tokens_kept: dict[str, float | None] = _in("visual_tokens", "kept", factory=dict)
    # the same, of energy_explained (ResPrune)
    energy_explained: dict[str, float | None] = _in("visual_tokens", "energy_explained", factory=dict)
    mean_stage_ms: dict[str, float] = field(default_factory=dict)
    # Per stage, its actors' busy time (the rows' stage times summed) and per actor of its largest pool.
    stage_busy_seconds: dict[str, dict[str, float]] = _in("stages", "busy_seconds", factory=dict)
    bound_by: str | None = _in("stages", "bound_by", None)  # the stage with the most busy time per actor
    output: str = ""
    wall_seconds: float = 0.0  # read -> stages -> write, actor start-up included
    accelerator: str | None = None
    cost_totals: dict[str, float] = field(default_factory=dict)  # every cost column, summed over answered rows
    cost_mean_per_image: dict[str, float | None] = field(default_factory=dict)
    reserved_usd: float = 0.0  # what the run's reservation cost over wall_seconds
    # A hybrid decoder's fixed per-sequence state (linear-attention layers), beside kv_cache_bytes; 0 dense.
    recurrent_state_bytes_per_sequence: int = 0
    utilisation: float | None = None  # share of reserved_usd the rows account for
    accuracy: float | None = None  # when the input has `expected`: normalised exact match over the short-answer rows
    caption_f1: float | None = None  # when it also has `question_type`: object F1 over the caption rows
    examples: list[dict[str, str]] = field(default_factory=list)  # a few rows, for a person to check
    manifest: str = ""
    engine: dict[str, str] = field(default_factory=dict)  # decode engine: name, package, version, interpreter
    engine_restarts: int = 0  # decode engines that died or got stuck and were replaced (pipeline.engines.watchdog)
    retried_batches: int = 0  # distinct decode batches that ran again on a fresh engine
    # With a task spec, per task: answered, errors (by kind, the image's own errors excluded), a
    # `choice` task's label counts, a `json` task's share of generated answers that validated.
    tasks: dict[str, dict[str, Any]] = _in("tasks", "by_task", factory=dict, when_set=True)
    # With a task spec and the shapes world's labels: each task scored against them (pipeline.tiny.scoring).
    task_scores: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def manifest_sections(self) -> dict[str, dict[str, Any]]:
        """The manifest's sections this summary fills (``rows``, ``visual_tokens``, ``stages``)."""
        sections: dict[str, dict[str, Any]] = {}
        for f in fields(self):
            if "manifest" in f.metadata and (getattr(self, f.name) or not f.metadata["when_set"]):
                section, key = f.metadata["manifest"]
                sections.setdefault(section, {})[key] = getattr(self, f.name)
        return sections


def read_output_rows(output: Location, spec: TaskSpec | None = None) -> list[dict[str, Any]]:
    """The columns the summary and manifest need, read back from what was written. With a task
    spec each row also gets the one-answer fields the summary reads: ``visual_tokens_kept`` (the
    mean over its answered tasks) and ``prompt_truncated`` (any task's)."""
    spec = spec or one_answer()
    time_columns = [c for cols in STAGE_TIME_COLUMNS.values() for c in cols]
    columns = ["id", "error", "extractor", "visual_tokens_in", *time_columns, *COST_COLUMNS]
    if spec.one_answer:
        columns += ["prompt", "answer", "visual_tokens_kept", "prompt_truncated"]
    else:
        columns += [f"{n}{suffix}" for n in spec.names
                    for suffix in ("", "_error", "_visual_tokens_kept", "_prompt_truncated")]
    ds = output.parquet_dataset()
    labels = ("energy_explained", "expected", "question_type", "prompt", "shape", "expected_objects")
    columns += [c for c in labels if c in ds.schema.names and c not in columns]
    rows = output.retrying(lambda: ds.to_table(columns=columns).to_pylist(), f"reading back {output.uri}")
    if not spec.one_answer:
        for r in rows:
            kept = [r[f"{n}_visual_tokens_kept"] for n in spec.names if not r[f"{n}_error"]]
            r["visual_tokens_kept"] = sum(kept) / len(kept) if kept else 0
            r["prompt_truncated"] = any(r[f"{n}_prompt_truncated"] for n in spec.names)
    return rows


def task_stats(rows: list[dict[str, Any]], spec: TaskSpec) -> dict[str, dict[str, Any]]:
    """Per task of a task spec: answered, errors by kind (images that failed as a whole are the
    rows' own errors, not counted here), a `choice` task's label counts, and a `json` task's
    validity: the share of the answers it generated that parsed and validated."""
    if spec.one_answer:
        return {}
    images = [r for r in rows if not r["error"] or any(not r[f"{n}_error"] for n in spec.names)]
    stats = {}
    for task in spec.tasks:
        errors = Counter(r[f"{task.name}_error"].split(":")[0] for r in images if r[f"{task.name}_error"])
        answered = sum(1 for r in images if not r[f"{task.name}_error"])
        entry: dict[str, Any] = {"type": task.type, "answered": answered, "errors": sum(errors.values()),
                                 "errors_by_kind": dict(errors)}
        if task.type == "choice":
            counts = Counter(r[task.name] for r in images if not r[f"{task.name}_error"])
            entry["labels"] = {label: counts.get(label, 0) for label in task.choices or ()}
        if task.type != "text":
            generated = answered + errors.get("invalid answer", 0)
            entry["valid_rate"] = round(answered / generated, 4) if generated else None
        stats[task.name] = entry
    return stats


def summarize(
    rows: list[dict[str, Any]], plan: InputPlan, already_done: int, output: str, run_cost: dict[str, Any],
    spec: TaskSpec | None = None,
) -> JobSummary:
    ok = [r for r in rows if not r["error"]]
    distinct = len({r["id"] for r in rows})

    def mean(key: str) -> float:
        return round(sum(r[key] for r in ok) / len(ok), 3) if ok else 0.0

    spec = spec or one_answer()
    labelled = spec.one_answer and bool(rows) and all(r.get("expected") is not None for r in rows)
    first = heapq.nsmallest(EXAMPLES, rows, key=lambda r: r["id"])
    if spec.one_answer:  # and a few captions, which a person reads differently from one-word answers
        first += heapq.nsmallest(CAPTION_EXAMPLES, [r for r in rows if is_caption(r) and r not in first],
                                 key=lambda r: r["id"])
        examples = [{k: r[k] or "" for k in ("id", "prompt", "answer", "error", "expected") if k in r} for r in first]
    else:  # each task's answer, or its error
        examples = [{"id": r["id"], "error": r["error"],
                     **{n: r[f"{n}_error"] or json.dumps(r[n], separators=(",", ":")) for n in spec.names}}
                    for r in first]
    scores = label_scores(rows) if labelled else {}
    return JobSummary(
        input_rows=plan.rows,
        expected_rows=plan.expected_rows,
        output_rows=len(rows),
        ok_rows=len(ok),
        error_rows=len(rows) - len(ok),
        errors_by_kind=dict(Counter(r["error"].split(":")[0] for r in rows if r["error"])),
        dropped=dict(plan.dropped),
        skipped_already_done=already_done,
        written_this_attempt=len(rows) - already_done,
        missing_ids=max(0, plan.expected_rows - distinct),
        duplicate_ids=len(rows) - distinct,
        truncated_prompts=sum(bool(r["prompt_truncated"]) for r in rows),
        extractors=dict(Counter(r["extractor"] for r in rows)),
        mean_visual_tokens_in=mean("visual_tokens_in"),
        mean_visual_tokens_kept=mean("visual_tokens_kept"),
        visual_tokens_kept=per_image_stats([r["visual_tokens_kept"] for r in ok]),
        energy_explained=per_image_stats([r["energy_explained"] for r in ok if r.get("energy_explained") is not None]),
        mean_stage_ms={k: mean(k) for cols in STAGE_TIME_COLUMNS.values() for k in cols},
        stage_busy_seconds={name: {"total": round(st["busy_seconds"], 3), "per_actor": round(st["busy_seconds_per_actor"], 3)}
                            for name, st in run_cost["stages"].items()},
        bound_by=run_cost["bound_by"],
        output=output,
        wall_seconds=round(run_cost["reserved"]["wall_seconds"], 3),
        accelerator=run_cost["accelerator"],
        cost_totals=run_cost["totals"],
        cost_mean_per_image=run_cost["mean_per_image"],
        reserved_usd=run_cost["reserved"]["usd"],
        recurrent_state_bytes_per_sequence=run_cost["recurrent_state_bytes_per_sequence"],
        utilisation=run_cost["reserved"]["utilisation"],
        accuracy=None if scores.get("accuracy") is None else round(scores["accuracy"], 4),
        caption_f1=None if scores.get("caption_f1") is None else round(scores["caption_f1"], 4),
        examples=examples,
        tasks=task_stats(rows, spec),
        task_scores=task_scores(rows, list(spec.tasks)) if not spec.one_answer else {},
    )
