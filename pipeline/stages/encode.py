"""Stage 3 (GPU): prepared images (``pipeline.stages.prepare``) -> visual tokens, pruned to the budget."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, NamedTuple

import numpy as np
import torch

from pipeline.config import ModelConfig, PruningConfig, StageConfig
from pipeline.io.storage import Location
from pipeline.models import Payload, Prepared, load_adapter, payload_bytes, payload_from_bytes, to_wire
from pipeline.pruning import ENERGY_TRACED, TEXT_GUIDED, energy_keep, get_method, relevance

from .common import Batch, Stopwatch, as_lists, errors_of, limit_torch_threads, map_splitting_failures, ok_rows
from .faults import crash, fail_if_poisoned


class EncodedRow(NamedTuple):
    features: torch.Tensor  # [N, D] visual tokens
    seed_scores: torch.Tensor | None  # [N], e.g. CLS attention
    words: Any  # [M, D] noun embeddings (M may be 0): of one selection (``_encode`` returns one per selection)
    encoder_patches: int  # patches the vision encoder ran over, all views
    payload: Payload = {}  # the family's, for all N tokens (the adapter's ``kept_payload`` cuts it)


class EncodeStage:
    """Drops ``prepared_image``; encodes each image once and selects its kept tokens once per
    distinct selection its tasks need: one per distinct noun list when the method reads the text
    (``TEXT_GUIDED``), else one for all tasks. Adds per row ``visual_kept``: the selections'
    tokens one after another ([sum of K, D] in the vision model's dtype as ``to_wire`` carries it:
    bf16 on GPUs, exactly the projector's output, half of float32); and one entry per selection:
    ``visual_payload`` (the family's payload cut
    to the kept tokens, floats in the same dtype, as ``payload_bytes``; b"" for none),
    ``kept_indices`` (ascending), ``energy_explained`` (ResPrune: the share of the image's token
    energy its kept tokens span; null for other methods), ``relevance_min/mean/max`` (null
    without nouns or for methods that ignore text); ``task_selection`` (per task, the index of
    its selection; -1 for a task with an error); and per image ``method``, ``keep`` (the budget
    applied; with ``pruning.energy``, its cap), ``visual_tokens_in``, ``encoder_patches``,
    ``encode_ms`` and ``prune_ms``."""

    def __init__(
        self, model: ModelConfig, pruning: PruningConfig, stage: StageConfig, source: Location | None = None,
    ) -> None:
        limit_torch_threads(stage.num_cpus)
        self.adapter = load_adapter(model, "vision", source)
        self.pruning = pruning
        self.alpha = pruning.alpha_for(self.adapter.default_alpha)

    def __call__(self, batch: Batch) -> Batch:
        crash("encode", [str(i) for i in batch["id"]])
        n = len(batch["id"])
        errors = errors_of(batch)
        watch = Stopwatch()
        rows = ok_rows(errors)
        # Per row, the distinct noun lists its tasks select with (one shared list when the method ignores text).
        wanted = {i: selections_of(batch["task_nouns"][i], batch["task_error"][i], self.pruning.method in TEXT_GUIDED)
                  for i in rows}
        items = [(str(batch["id"][i]), payload_from_bytes(batch["prepared_image"][i]), wanted[i][0]) for i in rows]
        encoded = map_splitting_failures(self._encode, items, "encode")
        feats: dict[tuple[int, int], EncodedRow] = {}
        for i, result in zip(rows, encoded, strict=True):
            if isinstance(result, str):
                errors[i] = result
            else:
                for s, words in enumerate(result.words):
                    feats[i, s] = result._replace(words=words)
        encode_ms = watch.per_row_ms(errors)

        watch = Stopwatch()
        pruned = prune_rows(feats, self.pruning, self.alpha)
        prune_ms = watch.per_row_ms(errors)

        wire = self.adapter.dtype  # the tokens were computed in it: casting back from float32 is exact
        selections = {i: sorted(s for (r, s) in pruned if r == i) for i in range(n)}
        batch.pop("prepared_image")
        batch["task_selection"] = [wanted[i][1] if i in wanted and selections[i] else [-1] * len(batch["task_error"][i])
                                   for i in range(n)]
        # The selections' tokens one after another ([sum of K, D]: one tensor column, as Arrow takes
        # it); the decode stage splits them by the lengths of ``kept_indices``.
        empty = torch.zeros((0, 0), dtype=wire)
        batch["visual_kept"] = [to_wire(torch.cat([feats[i, s].features[pruned[i, s].kept] for s in selections[i]])
                                        .to(wire) if selections[i] else empty) for i in range(n)]
        batch["visual_payload"] = [
            [payload_bytes({k: v.to(wire) if v.is_floating_point() else v
                            for k, v in self.adapter.kept_payload(feats[i, s].payload, pruned[i, s].kept).items()})
             for s in selections[i]] for i in range(n)]
        batch["kept_indices"] = [[pruned[i, s].kept.tolist() for s in selections[i]] for i in range(n)]
        batch["method"] = np.array([self.pruning.method] * n)
        first = {i: feats[i, 0] for i in range(n) if (i, 0) in feats}
        batch["keep"] = np.array([pruned[i, 0].budget if i in first else 0 for i in range(n)], dtype=np.int64)
        batch["visual_tokens_in"] = np.array([first[i].features.shape[0] if i in first else 0 for i in range(n)],
                                             dtype=np.int64)
        batch["encoder_patches"] = np.array([first[i].encoder_patches if i in first else 0 for i in range(n)])
        batch["energy_explained"] = [[pruned[i, s].energy_explained for s in selections[i]] for i in range(n)]
        for k, name in enumerate(("relevance_min", "relevance_mean", "relevance_max")):
            batch[name] = [[pruned[i, s].relevance[k] if pruned[i, s].relevance else None for s in selections[i]]
                           for i in range(n)]
        batch["error"] = np.array(errors, dtype=object)
        batch["encode_ms"] = encode_ms
        batch["prune_ms"] = prune_ms
        return as_lists(batch)

    def _encode(self, items: list[tuple[str, Prepared, list[list[str]]]]) -> list[EncodedRow]:
        """Each image through the vision tower once; ``words`` holds one noun embedding per selection."""
        fail_if_poisoned("encode", [rid for rid, _, _ in items])
        enc = self.adapter.encode_prepared([prepared for _, prepared, _ in items])
        nouns = [n for _, _, lists in items for n in lists]
        flat = iter(self.adapter.embed_words(nouns))
        words = [[next(flat).cpu() for _ in lists] for _, _, lists in items]
        scores = enc.seed_scores or [None] * len(items)
        return [
            EncodedRow(f.cpu(), s.cpu() if s is not None else None, w, int(patches),
                       {name: x.cpu() for name, x in payload.items()})
            for f, s, w, patches, payload in zip(
                enc.features, scores, words, enc.encoder_patches, enc.payloads, strict=True
            )
        ]


def selections_of(task_nouns: Any, task_errors: Any, text_guided: bool) -> tuple[list[list[str]], list[int]]:
    """``(noun lists, per task its selection)``: the distinct noun lists a row's tasks without
    an error select with, in first-use order (one, the first task's, when selection ignores the
    text: every task then shares it), and each task's index into them (-1: the task has an error)."""
    lists: list[list[str]] = []
    index: list[int] = []
    for nouns, error in zip(task_nouns, task_errors, strict=True):
        if error:
            index.append(-1)
            continue
        key = list(nouns) if text_guided or not lists else lists[0]
        if key not in lists:
            lists.append(key)
        index.append(lists.index(key))
    return lists, index


class Pruned(NamedTuple):
    kept: torch.Tensor  # kept token indices, ascending (spatial order)
    budget: int  # the budget applied: every token for method ``none``; an adaptive budget's cap
    energy_explained: float | None  # methods with an energy trace (ResPrune), else None
    relevance: tuple[float, float, float] | None  # min / mean / max text relevance, when used


def prune_rows(rows: dict[Any, EncodedRow], pruning: PruningConfig, alpha: float) -> dict[Any, Pruned]:
    """Select per row, batched over rows with the same token count (and so the same budget).

    ResPrune always traces its energy (``energy_explained`` per row); with ``pruning.energy`` a
    batch runs the greedy once to the cap and cuts each row at its own count
    (``pipeline.pruning.energy_keep``): the picks are nested, so the cut rows are exactly what a
    fixed budget of that count would keep."""
    select, traced = get_method(pruning.method), ENERGY_TRACED.get(pruning.method)
    groups: dict[int, list[Any]] = defaultdict(list)
    for i, row in rows.items():
        groups[row.features.shape[0]].append(i)
    out: dict[int, Pruned] = {}
    for members in groups.values():
        visual = torch.stack([rows[i].features for i in members])
        has_scores = all(rows[i].seed_scores is not None for i in members)
        scores = torch.stack([rows[i].seed_scores for i in members]) if has_scores else None
        rel = relevance(visual, [rows[i].words for i in members]) if pruning.method in TEXT_GUIDED else None
        n = visual.shape[1]
        keep = n if pruning.method == "none" else pruning.keep_for(n)
        if traced is not None and (pruning.energy is not None or keep < n):
            idx, trace = traced(visual, keep, relevance=rel, scores=scores, alpha=alpha,
                                gated=pruning.energy_weighting == "gated")
            counts = energy_keep(trace, pruning.energy, pruning.min_keep) if pruning.energy is not None else None
        else:  # every token kept (explains all of the energy: nothing to trace), or no trace
            idx = select(visual, keep, relevance=rel, scores=scores, alpha=alpha, rng_seed=pruning.rng_seed)
            trace = torch.ones((len(members), keep), dtype=torch.float64) if traced is not None else None
            counts = None
        for row, i in enumerate(members):
            k = int(counts[row]) if counts is not None else idx.shape[1]
            r = rel[row] if rel is not None and not torch.isnan(rel[row]).any() else None
            out[i] = Pruned(
                kept=idx[row, :k].sort().values,
                budget=keep,
                energy_explained=None if trace is None else float(trace[row, k - 1]),
                relevance=None if r is None else (float(r.min()), float(r.mean()), float(r.max())),
            )
    return out
