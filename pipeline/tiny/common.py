"""What every tiny family shares: the seed, the BPE tokenizer, the weight drawing and the atomic save."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

VERSION = "v3"  # bump when a recipe changes so caches rebuild (v3: the Llama-style decoder)
SEED = 1234

_WORDS = """
what which where how many is are there the a an in on of to and or with image picture photo
color colour shape shapes red green blue yellow white black orange purple circle square
triangle star cube ball box dog cat car bus tree person man woman left right top bottom
center middle background small large big answer question using single word phrase yes no
please option letter from given choices directly describe detail this that it its one two
three four five six seven eight nine ten user assistant count number visible shown
""".split()


def tiny_tokenizer(extra_specials: tuple[str, ...] = (), **tokens: Any) -> Any:
    """The BPE tokenizer every recipe shares (trained here in well under a second). A family
    whose template needs more special tokens appends them (``extra_specials``) and names its
    own (``tokens``: eos_token, pad_token, extra_special_tokens, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>", *extra_specials]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    # Decoded as sentencepiece-converted Llama tokenizers are ("▁" -> space, then the first space
    # stripped): the same text as a Metaspace decoder, in the form the grammar library that
    # constrains answers (xgrammar, both engines) reads as space-prefixed words.
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    corpus = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(len(_WORDS))]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=list(string.printable), show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    named = {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "extra_special_tokens": {"image_token": "<image>"}, **tokens,
    }
    return PreTrainedTokenizerFast(tokenizer_object=bpe, padding_side="left", **named)


def randomize_weights(model: Any, std: dict[str, float] | None = None) -> None:
    """Every weight drawn from the global torch seed (set it first): the checkpoint is identical
    across machines. Norms stay at 1. The projector is scaled so visual tokens dwarf text
    embeddings (norms ~17 vs ~0.8, as in real LLaVA-1.5) and answers depend on the image; the
    LLM's std keeps them varied. ``std``: parameter-name part -> std, first match wins (the
    default names LLaVA's modules); everything else 0.05."""
    import torch

    std = std or {"vision_tower": 0.02, "multi_modal_projector": 0.1}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, next((v for k, v in std.items() if k in name), 0.05))


def save_checkpoint(model: Any, processor: Any, out: Path) -> Path:
    """``save_pretrained`` the model and its processor (or a tuple of processor parts) into
    ``out`` atomically, so concurrent builders are safe (an existing ``out`` is kept)."""
    from pipeline.models.sources import materialize

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        for part in processor if isinstance(processor, tuple) else (processor,):
            part.save_pretrained(tmp)

    return materialize(out, save)
