"""The reference engine: Hugging Face ``generate`` in padded batches.

The engine owns the batch: it asks the family adapter for each row's model inputs
(``VisionLanguageAdapter.hf_inputs``: token ids or input embeddings, and position ids where the
family places tokens itself), left-pads them into one batch, calls ``model.generate`` and cuts
each answer at its first EOS. Families whose LLM runs through the stock ``generate`` need
nothing else here.

Constrained answers (a task's ``choice`` or JSON Schema, ``pipeline.tasks.Constraint``) go through
xgrammar's logits processor for transformers, with the grammars the vLLM engine hands vLLM's
xgrammar backend for the same constraint (``Constraint.choice_grammar``; JSON Schema compiled
without free whitespace, as vLLM does), so the two engines mask the same tokens.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pipeline.models import DecodeRequest, Generation, HFInputs

from .base import DecodeEngine

if TYPE_CHECKING:
    from pipeline.config import GenerationConfig
    from pipeline.tasks import Constraint


class HFEngine(DecodeEngine):
    name = "hf"
    schedules_batches = False  # static padded batches: the stage groups rows by length

    def __init__(self, adapter: Any) -> None:
        super().__init__(adapter)
        self._compiler: Any = None  # xgrammar's, built on the first constrained request
        self._grammars: dict[Constraint, Any] = {}

    @torch.inference_mode()
    def generate(self, requests: list[DecodeRequest], gen: GenerationConfig) -> list[Generation]:
        """One ``generate`` per bound and constraint among ``requests`` (the decode stage sends one
        task's rows per call, so usually one)."""
        adapter = self.adapter
        groups: dict[tuple[int, Constraint | None], list[int]] = defaultdict(list)
        for k, r in enumerate(requests):
            groups[r.max_new_tokens or gen.max_new_tokens, r.constraint].append(k)
        out: list[Generation | None] = [None] * len(requests)
        for (new_tokens, rule), members in groups.items():
            options = gen if new_tokens == gen.max_new_tokens else gen.model_copy(update={"max_new_tokens": new_tokens})
            processors = [self._logits_processor(rule)] if rule is not None else None
            results = generate_from_inputs(adapter.model, adapter.tokenizer, adapter.embed,
                                           adapter.hf_inputs([requests[k] for k in members]), options, processors)
            for k, result in zip(members, results, strict=True):
                out[k] = result
        return out  # type: ignore[return-value]  # every index filled

    def _logits_processor(self, rule: Constraint) -> Any:
        """A fresh xgrammar processor (one per ``generate`` call: it keeps per-row state) for ``rule``."""
        import xgrammar as xgr
        from xgrammar.contrib.hf import LogitsProcessor

        if self._compiler is None:
            model, tokenizer = self.adapter.model, self.adapter.tokenizer
            eos = model.generation_config.eos_token_id
            info = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=model.get_output_embeddings().weight.shape[0],
                stop_token_ids=eos if isinstance(eos, list) else [eos] if eos is not None else None,
            )
            self._compiler = xgr.GrammarCompiler(info)
        if rule not in self._grammars:
            self._grammars[rule] = (
                self._compiler.compile_grammar(rule.choice_grammar) if rule.choices else
                self._compiler.compile_json_schema(rule.json_schema, any_whitespace=False, separators=(",", ":"))
            )
        return LogitsProcessor(self._grammars[rule])


def generate_from_inputs(
    model: object, tokenizer: object, embed: torch.nn.Module, inputs: HFInputs, gen: GenerationConfig,
    logits_processors: list[Any] | None = None,
) -> list[Generation]:
    """``model.generate`` on ``inputs``' rows left-padded into one batch, the answers cut at EOS.

    Rows of token ids are padded with the pad token, rows of embeddings with its embedding; a
    row's ``positions`` ([P, L_i], e.g. Qwen's 3-D M-RoPE rows) are padded with zeros (masked
    out), and ``generate`` continues each row from its last position + 1. Without them positions
    are contiguous."""
    rows = inputs.rows
    device = rows[0].device
    # Left padding: every row's last position is its own last prompt token.
    width = max(len(r) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    token_ids = rows[0].dim() == 1
    if token_ids:
        batch = {"input_ids": torch.stack([torch.cat([r.new_full((width - len(r),), pad_id), r]) for r in rows])}
    else:
        pad = embed(torch.tensor([pad_id], device=device))
        batch = {"inputs_embeds": torch.stack([torch.cat([pad.expand(width - len(r), -1), r]) for r in rows])}
    batch["attention_mask"] = torch.stack(
        [torch.cat([torch.zeros(width - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)]) for r in rows]
    ).to(device)
    if inputs.positions is not None:
        batch["position_ids"] = left_padded_positions(inputs.positions, width).to(device)
    if logits_processors:
        from transformers import LogitsProcessorList

        batch["logits_processor"] = LogitsProcessorList(logits_processors)
    new = model.generate(**batch, **inputs.extra, pad_token_id=pad_id, **generate_options(gen))
    if token_ids:  # generate returns the prompt's ids before the new ones (embeddings: the new ones only)
        new = new[:, width:]
    return cut_at_eos(model, tokenizer, [len(r) for r in rows], new)


def left_padded_positions(positions: list[Tensor], width: int) -> Tensor:
    """Per-row position ids [P, L_i] left-padded into one [P, B, width] batch; padding positions
    are masked out, so 0 is as good as any."""
    return torch.stack([torch.cat([p.new_zeros((p.shape[0], width - p.shape[1])), p], dim=1) for p in positions], dim=1)


def generate_options(gen: GenerationConfig) -> dict:
    """``model.generate`` keywords for ``gen`` (seeding the global generator when sampling)."""
    options: dict = {"max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample}
    if gen.do_sample:
        torch.manual_seed(gen.seed)
        options |= {"temperature": gen.temperature, "top_p": gen.top_p}
    return options


def cut_at_eos(model: object, tokenizer: object, prompt_lengths: list[int], new: Tensor) -> list[Generation]:
    """Per row, the generated ids [B, T] (new tokens only) up to and including the first EOS, decoded."""
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    out = []
    for length, seq in zip(prompt_lengths, new.tolist(), strict=True):
        n = next((i + 1 for i, t in enumerate(seq) if t in eos_ids), len(seq))
        text = tokenizer.decode(seq[:n], skip_special_tokens=True).strip()
        out.append(Generation(text=text, prompt_tokens=length, generated_tokens=n, token_ids=seq[:n]))
    return out
