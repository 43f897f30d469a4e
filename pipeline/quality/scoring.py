"""How an answer is judged against a label (one place for every scoring rule, used by the job's
summary, the evaluation job and the training script alike).

- Short answers (one word): normalised exact match (``is_correct``).
- Captions of the shapes world (``question_type == "caption"``): the objects a caption names,
  ``(colour, shape)`` pairs parsed back out of the text (``caption_objects``), matched against
  the expected caption's as multisets: object-level precision, recall and F1
  (``caption_match``), plus whether the order is right too.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pipeline.io.sample_corpus import COLOURS, SHAPES

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
# "a red circle", "purple triangles": a colour word directly followed by a shape word.
_OBJECT = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})s?\b")


def normalise(text: str | None) -> str:
    """Lower case, punctuation stripped, whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", (text or "").lower()).split())


def is_correct(row: dict[str, Any]) -> bool:
    """An output row with ``answer``, ``error`` and ``expected``: error rows are wrong."""
    return not row["error"] and normalise(row["answer"]) == normalise(row["expected"])


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


def is_caption(row: dict[str, Any]) -> bool:
    """A labelled caption row (shapes world: ``question_type == "caption"``), scored by objects."""
    return row.get("question_type") == "caption"


def label_scores(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """What a labelled run reports (the job summary's rule): ``accuracy``, exact match over the
    short-answer rows (every row that is not a caption), and ``caption_f1``, object F1 over the
    caption rows (None where a kind is absent)."""
    short = [r for r in rows if not is_caption(r)]
    captions = [r for r in rows if is_caption(r)]
    return {"accuracy": sum(is_correct(r) for r in short) / len(short) if short else None,
            "caption_f1": caption_summary(captions)["f1"] if captions else None}
