"""Caption scoring for the shapes world (``shapes_world``): its captions name objects, ``(colour,
shape)`` pairs, which are parsed back out of the text (``caption_objects``) and matched against
the expected caption's as multisets: object-level precision, recall and F1 (``caption_match``),
plus whether the order is right too.

Only rows that carry this world's caption labels are scored (``is_shapes_caption``: a caption row
whose ``expected`` names objects of the world, as ``shapes_world`` writes them); the product's
quality code (``pipeline.quality.scoring``) reaches ``caption_scores`` by name where a corpus
has labelled captions. Short answers are scored there too, by normalised exact match.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pipeline.quality.scoring import is_caption, normalise

from .shapes_world import COLOURS, SHAPES

# "a red circle", "purple triangles": a colour word directly followed by a shape word.
_OBJECT = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})s?\b")


def caption_objects(text: str | None) -> list[tuple[str, str]]:
    """The ``(colour, shape)`` objects a caption names, in the order it names them."""
    return _OBJECT.findall(normalise(text))


@dataclass(frozen=True)
class CaptionMatch:
    """One caption against its label: object counts (multiset matching) and order."""

    predicted: int  # objects the answer names
    expected: int  # objects the label names
    matched: int  # size of the multiset intersection
    in_order: bool  # the answer names exactly the label's objects, in the label's order

    @property
    def precision(self) -> float:
        return self.matched / self.predicted if self.predicted else float(self.expected == 0)

    @property
    def recall(self) -> float:
        return self.matched / self.expected if self.expected else 1.0

    @property
    def f1(self) -> float:
        return f1(self.matched, self.predicted, self.expected)


def f1(matched: int, predicted: int, expected: int) -> float:
    """Object-level F1 from counts (summed over rows: micro F1)."""
    return 2 * matched / (predicted + expected) if predicted + expected else 1.0


def caption_match(row: dict[str, Any]) -> CaptionMatch:
    """An output row with ``answer``, ``error`` and ``expected``: an error row names no object."""
    want = caption_objects(row["expected"])
    got = [] if row["error"] else caption_objects(row["answer"])
    matched = sum((Counter(got) & Counter(want)).values())
    return CaptionMatch(len(got), len(want), matched, got == want)


def caption_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Micro precision / recall / F1 over all objects of ``rows`` (captions), and order accuracy
    (share of rows naming exactly the label's objects in its order)."""
    matches = [caption_match(r) for r in rows]
    p, e, m = (sum(getattr(x, k) for x in matches) for k in ("predicted", "expected", "matched"))
    return {"precision": m / p if p else 0.0, "recall": m / e if e else 0.0, "f1": f1(m, p, e),
            "order_accuracy": sum(x.in_order for x in matches) / len(matches) if matches else 0.0}


def is_shapes_caption(row: dict[str, Any]) -> bool:
    """A caption row labelled by this world: ``question_type == "caption"`` and an ``expected``
    caption naming at least one of its objects (every caption of the world names one or more)."""
    return is_caption(row) and bool(caption_objects(row.get("expected")))


def caption_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """``caption_summary`` over the rows that carry this world's caption labels; ``{}`` when none
    do (object F1 means nothing against labels that name none of the world's objects)."""
    labelled = [r for r in rows if is_shapes_caption(r)]
    return caption_summary(labelled) if labelled else {}


def task_scores(rows: list[dict[str, Any]], tasks: list[Any]) -> dict[str, dict[str, float | int | str]]:
    """Annotation tasks (docs/tasks.md) scored against this world's labels, on output rows that
    carry them (``expected_objects``; ``shape``): a ``text`` task's answer as a caption and a
    ``json`` task's ``objects`` by object F1 (``caption_match``'s multiset rule) against every
    object in the image; a ``choice`` task whose prompt names ``{shape}`` by accuracy against that
    shape's colour. An answer the task did not give (an error) counts as wrong (names no object).
    ``{}`` when the rows carry no labels."""
    labelled = [r for r in rows if r.get("expected_objects")]
    if not labelled:
        return {}
    out: dict[str, dict[str, float | int | str]] = {}
    for task in tasks:
        name = task.name
        if task.type == "choice" and "{shape}" in task.prompt:
            asked = [r for r in labelled if r.get("shape")]
            right = sum(1 for r in asked if not r[f"{name}_error"] and r[name] == _colour_of(r))
            out[name] = {"metric": "accuracy", "value": right / len(asked) if asked else 0.0, "rows": len(asked)}
            continue
        if task.type not in ("text", "json"):
            continue
        p = e = m = 0
        for r in labelled:
            want = [(o["colour"], o["shape"]) for o in json.loads(r["expected_objects"])]
            got = [] if r[f"{name}_error"] else _objects_of(r[name]) if task.type == "json" else caption_objects(r[name])
            p, e, m = p + len(got), e + len(want), m + sum((Counter(got) & Counter(want)).values())
        out[name] = {"metric": "object_f1", "value": f1(m, p, e), "rows": len(labelled)}
    return out


def _colour_of(row: dict[str, Any]) -> str | None:
    return next((o["colour"] for o in json.loads(row["expected_objects"]) if o["shape"] == row["shape"]), None)


def _objects_of(value: Any) -> list[tuple[str, str]]:
    """``(colour, shape)`` pairs of a JSON answer holding ``{"objects": [{"colour", "shape"}, ...]}``."""
    items = value.get("objects") if isinstance(value, dict) else None
    return [(o.get("colour"), o.get("shape")) for o in items or [] if isinstance(o, dict)]
