"""How an answer is judged against a label (one place for the scoring rules of the job's summary
and the evaluation grid), for any corpus with an ``expected`` column.

- Short answers (every row but the captions): normalised exact match (``is_correct``).
- Captions (``question_type == "caption"``): not exact-matched. Where the labels are the shapes
  world's, its own scorer gives object-level precision, recall and F1 and order accuracy
  (``caption_scores``); that world is test and demo scaffolding (``pipeline.tiny``), reached by
  name (``CAPTION_SCORER``) and imported only when rows carry caption labels.
"""

from __future__ import annotations

import importlib
import re
import string
from typing import Any

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
# "module:function" scoring labelled caption rows: {} or precision, recall, f1, order_accuracy.
CAPTION_SCORER = "pipeline.tiny.scoring:caption_scores"


def normalise(text: str | None) -> str:
    """Lower case, punctuation stripped, whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", (text or "").lower()).split())


def is_correct(row: dict[str, Any]) -> bool:
    """An output row with ``answer``, ``error`` and ``expected``: error rows are wrong."""
    return not row["error"] and normalise(row["answer"]) == normalise(row["expected"])


def is_caption(row: dict[str, Any]) -> bool:
    """A caption row (``question_type == "caption"``): long text, never exact-matched."""
    return row.get("question_type") == "caption"


def caption_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Object precision / recall / F1 and order accuracy of the labelled caption rows of ``rows``
    whose labels are the shapes world's (``CAPTION_SCORER``); ``{}`` when there are none."""
    captions = [r for r in rows if is_caption(r) and r.get("expected") is not None]
    if not captions:
        return {}
    module, function = CAPTION_SCORER.split(":")
    return getattr(importlib.import_module(module), function)(captions)


def label_scores(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """What a labelled run reports (the job summary's rule): ``accuracy``, exact match over the
    labelled short-answer rows (every row that is not a caption), and ``caption_f1``, object F1
    over the caption rows labelled by the shapes world (None where a kind is absent)."""
    short = [r for r in rows if not is_caption(r) and r.get("expected") is not None]
    return {"accuracy": sum(is_correct(r) for r in short) / len(short) if short else None,
            "caption_f1": caption_scores(rows).get("f1")}
