"""How an answer is judged against a label: normalised exact match (one rule, used by the job's
summary and the evaluation job alike)."""

from __future__ import annotations

import re
import string
from typing import Any

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise(text: str | None) -> str:
    """Lower case, punctuation stripped, whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", (text or "").lower()).split())


def is_correct(row: dict[str, Any]) -> bool:
    """An output row with ``answer``, ``error`` and ``expected``: error rows are wrong."""
    return not row["error"] and normalise(row["answer"]) == normalise(row["expected"])
