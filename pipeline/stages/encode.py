"""Stage 3 (GPU): prepared images (``pipeline.stages.prepare``) -> visual tokens, pruned to the budget."""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import numpy as np
import torch

from pipeline.config import ModelConfig, PruningConfig, StageConfig
from pipeline.io.storage import Location
from pipeline.models import Payload, Prepared, load_adapter, payload_bytes, payload_from_bytes, to_wire
from pipeline.pruning import ENERGY_TRACED, TEXT_GUIDED, energy_keep, get_method, relevance

from .common import Batch, Stopwatch, errors_of, limit_torch_threads, list_column, map_splitting_failures, ok_rows
from .faults import crash, fail_if_poisoned


class EncodedRow(NamedTuple):
    features: torch.Tensor  # [N, D] visual tokens
    seed_scores: torch.Tensor | None  # [N], e.g. CLS attention
    words: torch.Tensor  # [M, D] noun embeddings (M may be 0)
    encoder_patches: int  # patches the vision encoder ran over, all views
    payload: Payload = {}  # the family's, for all N tokens (the adapter's ``kept_payload`` cuts it)


class EncodeStage:
    """Drops ``prepared_image``; adds ``visual_kept`` ([K, D] in the vision model's dtype as
    ``to_wire`` carries it: bf16 on GPUs, exactly the projector's output, half of float32; for the
    decode stage), ``visual_payload`` (the family's payload cut to the kept tokens, floats in the
    same dtype, as ``payload_bytes``; b"" for none, for the decode stage), ``kept_indices`` (ascending), ``method``,
    ``keep`` (the budget applied to the row; with ``pruning.energy``, its cap), ``visual_tokens_in/kept``,
    ``energy_explained`` (ResPrune: the share of the image's token energy its kept tokens span;
    null for other methods), ``encoder_patches``, ``relevance_min/mean/max`` (null without nouns
    or for methods that ignore text), ``encode_ms`` and ``prune_ms``."""

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
        items = [(str(batch["id"][i]), payload_from_bytes(batch["prepared_image"][i]), list(batch["nouns"][i]))
                 for i in rows]
        encoded = map_splitting_failures(self._encode, items, "encode")
        feats: dict[int, EncodedRow] = {}
        for i, result in zip(rows, encoded, strict=True):
            if isinstance(result, str):
                errors[i] = result
            else:
                feats[i] = result
        encode_ms = watch.per_row_ms(errors)

        watch = Stopwatch()
        pruned = prune_rows(feats, self.pruning, self.alpha)
        prune_ms = watch.per_row_ms(errors)

        wire = self.adapter.dtype  # the tokens were computed in it: casting back from float32 is exact
        empty = to_wire(torch.zeros((0, 0), dtype=wire))
        visual_kept, payloads = np.empty(n, dtype=object), np.empty(n, dtype=object)
        for i in range(n):
            visual_kept[i] = to_wire(feats[i].features[pruned[i].kept].to(wire)) if i in pruned else empty
            payloads[i] = (payload_bytes({k: v.to(wire) if v.is_floating_point() else v
                                          for k, v in self.adapter.kept_payload(feats[i].payload, pruned[i].kept).items()})
                           if i in pruned else b"")
        batch.pop("prepared_image")
        batch["nouns"] = list_column(batch["nouns"])
        batch["visual_kept"] = visual_kept
        batch["visual_payload"] = payloads
        batch["kept_indices"] = [pruned[i].kept.tolist() if i in pruned else [] for i in range(n)]
        batch["method"] = np.array([self.pruning.method] * n)
        tokens_in = [feats[i].features.shape[0] if i in feats else 0 for i in range(n)]
        batch["keep"] = np.array([pruned[i].budget if i in pruned else 0 for i in range(n)], dtype=np.int64)
        batch["visual_tokens_in"] = np.array(tokens_in, dtype=np.int64)
        batch["visual_tokens_kept"] = np.array([len(pruned[i].kept) if i in pruned else 0 for i in range(n)],
                                               dtype=np.int64)
        batch["energy_explained"] = [pruned[i].energy_explained if i in pruned else None for i in range(n)]
        batch["encoder_patches"] = np.array([feats[i].encoder_patches if i in feats else 0 for i in range(n)])
        for k, name in enumerate(("relevance_min", "relevance_mean", "relevance_max")):
            batch[name] = [pruned[i].relevance[k] if i in pruned and pruned[i].relevance else None for i in range(n)]
        batch["error"] = np.array(errors, dtype=object)
        batch["encode_ms"] = encode_ms
        batch["prune_ms"] = prune_ms
        return batch

    def _encode(self, items: list[tuple[str, Prepared, list[str]]]) -> list[EncodedRow]:
        fail_if_poisoned("encode", [rid for rid, _, _ in items])
        enc = self.adapter.encode_prepared([prepared for _, prepared, _ in items])
        words = self.adapter.embed_words([nouns for _, _, nouns in items])
        scores = enc.seed_scores or [None] * len(items)
        return [
            EncodedRow(f.cpu(), s.cpu() if s is not None else None, t.cpu(), int(patches),
                       {name: x.cpu() for name, x in payload.items()})
            for f, s, t, patches, payload in zip(
                enc.features, scores, words, enc.encoder_patches, enc.payloads, strict=True
            )
        ]


class Pruned(NamedTuple):
    kept: torch.Tensor  # kept token indices, ascending (spatial order)
    budget: int  # the budget applied: every token for method ``none``; an adaptive budget's cap
    energy_explained: float | None  # methods with an energy trace (ResPrune), else None
    relevance: tuple[float, float, float] | None  # min / mean / max text relevance, when used


def prune_rows(rows: dict[int, EncodedRow], pruning: PruningConfig, alpha: float) -> dict[int, Pruned]:
    """Select per row, batched over rows with the same token count (and so the same budget).

    ResPrune always traces its energy (``energy_explained`` per row); with ``pruning.energy`` a
    batch runs the greedy once to the cap and cuts each row at its own count
    (``pipeline.pruning.energy_keep``): the picks are nested, so the cut rows are exactly what a
    fixed budget of that count would keep."""
    select, traced = get_method(pruning.method), ENERGY_TRACED.get(pruning.method)
    groups: dict[int, list[int]] = defaultdict(list)
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
