"""Tiny, real LLaVA-1.5 checkpoints built offline, for tests and the local default.

Real transformers classes with small shapes: a CLIP vision tower at 336 px / 14 px patches
(576 patch tokens plus CLS, like LLaVA-1.5), the LLaVA projector, a small Llama, a BPE
tokenizer trained here with ``tokenizers``, the real image processor and the LLaVA-1.5 chat
template. Saved with ``save_pretrained`` and loaded back through ``from_pretrained(path)``,
the same code path as a hub checkpoint. Deterministic (seeded), built once per cache key.

Recipes (``RECIPES``; same classes, tokenizer, chat template and seed for all):

- ``tiny:llava``: CLIP width 64 x 3 layers, Llama width 256 x 2 layers. Tests and the demo.
- ``tiny:llava-bench``: CLIP width 256 x 4 layers, Llama width 1024 x 8 layers (MLP 2816,
  16 heads). CPU-sized, with LLaVA-1.5-7B's LLM-to-vision FLOP ratio (~20.9 vs ~20.2 at 576
  visual + 42 text tokens), so pruning speed-ups on it mean what they would on the real model.
- ``tiny:llava-shapes``: trained, not random, to answer questions about the shapes world
  (``pipeline.io.sample_corpus``) by ``jobs/train_tiny_vlm.py`` from transformers' own
  initialisation; the committed checkpoint in ``pipeline/models/checkpoints/`` (95 % on short
  questions and caption object F1 0.90-0.91 held-out, every token kept; see the README), never built at run time. Its image processor pads to
  square as LLaVA-1.5 does. The embedded default (``configs/local.yaml``).

    python -m pipeline.models.tiny [--recipe llava] [--out DIR]   # prints the directory
    model.path: "tiny:llava" in a config                          # resolves to the cached directory

The other families' tiny checkpoints (``tiny:llava_next``, ``tiny:qwen2_5_vl``, ``tiny:qwen3_vl``) are built by a
builder beside each family (``FAMILY_BUILDERS``), cached the same way.
"""

from __future__ import annotations

import argparse
import importlib
import string
from pathlib import Path
from typing import Any

from .sources import cache_root, materialize

_VERSION = "v2"  # bump when the recipe changes so caches rebuild
_SEED = 1234

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), as in llava-hf checkpoints.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_WORDS = """
what which where how many is are there the a an in on of to and or with image picture photo
color colour shape shapes red green blue yellow white black orange purple circle square
triangle star cube ball box dog cat car bus tree person man woman left right top bottom
center middle background small large big answer question using single word phrase yes no
please option letter from given choices directly describe detail this that it its one two
three four five six seven eight nine ten user assistant count number visible shown
""".split()


# Per-recipe sizes; everything else (classes, tokenizer, template, seed, init) is shared.
# `llava` must never change (its checkpoint is tested to be deterministic across builds).
RECIPES: dict[str, dict[str, int]] = {
    "llava": {
        "vision_width": 64, "vision_mlp": 128, "vision_layers": 3, "vision_heads": 4,
        "text_width": 256, "text_mlp": 512, "text_layers": 2, "text_heads": 4, "text_kv_heads": 2, "head_dim": 64,
    },
    # Why these: widths where fp32 GEMMs dominate a 2-core CPU's time; 8 LLM layers put the
    # LLM-to-vision FLOP ratio within ~3.4% of LLaVA-1.5-7B's (tests/test_bench_model.py), and
    # keep-all prefill of one image (~140 GFLOP) takes about a second. MHA, as in Vicuna-7B.
    "llava-bench": {
        "vision_width": 256, "vision_mlp": 1024, "vision_layers": 4, "vision_heads": 4,
        "text_width": 1024, "text_mlp": 2816, "text_layers": 8, "text_heads": 16, "text_kv_heads": 16, "head_dim": 64,
    },
    # Trained (jobs/train_tiny_vlm.py), small enough to train on a 2-core CPU and commit.
    "llava-shapes": {
        "vision_width": 96, "vision_mlp": 192, "vision_layers": 3, "vision_heads": 4,
        "text_width": 128, "text_mlp": 256, "text_layers": 3, "text_heads": 4, "text_kv_heads": 2, "head_dim": 32,
        "pad_to_square": 1,
    },
}
TRAINED = {"llava-shapes"}  # committed checkpoints, never built with random weights
# The other families' tiny checkpoints: recipe -> "module:function" returning a fresh, seeded
# (model, processor); each builder lives beside its family (imported only when built).
FAMILY_BUILDERS: dict[str, str] = {
    "llava_next": "pipeline.models.tiny_llava_next:new_tiny_llava_next",
    "qwen2_5_vl": "pipeline.models.tiny_qwen2_5_vl:new_tiny_qwen2_5_vl",
    "qwen3_vl": "pipeline.models.tiny_qwen3_vl:new_tiny_qwen3_vl",
}
CHECKPOINTS = Path(__file__).parent / "checkpoints"


def tiny_checkpoint(recipe: str) -> str:
    """The directory of tiny checkpoint ``recipe``: committed (trained), or built into the cache
    if missing."""
    if recipe in FAMILY_BUILDERS:
        target = cache_root() / f"tiny-{recipe}-{_VERSION}"
        if not (target / "config.json").exists():
            build_family(recipe, target)
        return str(target)
    if recipe not in RECIPES:
        raise ValueError(f"no tiny model recipe for {recipe!r}; known: {', '.join([*RECIPES, *FAMILY_BUILDERS])}")
    if recipe in TRAINED:
        trained = CHECKPOINTS / f"tiny-{recipe}"
        if not (trained / "config.json").exists():
            raise ValueError(f"the trained checkpoint {trained} is missing: python jobs/train_tiny_vlm.py --out {trained}")
        return str(trained)
    target = cache_root() / f"tiny-{recipe}-{_VERSION}"  # "tiny-llava-v2": the name tiny:llava always had
    if not (target / "config.json").exists():
        build_tiny_llava(target, recipe)
    return str(target)


def tiny_tokenizer(extra_specials: tuple[str, ...] = (), **tokens: Any) -> Any:
    """The BPE tokenizer every recipe shares (trained here in well under a second). A family
    whose template needs more special tokens appends them (``extra_specials``) and names its
    own (``tokens``: eos_token, pad_token, extra_special_tokens, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>", *extra_specials]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
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


def recipe_config(recipe: str, tokenizer: Any | None = None) -> Any:
    """The ``LlavaConfig`` of ``recipe`` (no weights): what the build uses, and what shape and
    FLOP checks can read without building anything."""
    if recipe not in RECIPES:
        raise ValueError(f"no tiny model recipe for {recipe!r}; known: {', '.join(RECIPES)}")
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    r = RECIPES[recipe]
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=336, patch_size=14, hidden_size=r["vision_width"], intermediate_size=r["vision_mlp"],
            num_hidden_layers=r["vision_layers"], num_attention_heads=r["vision_heads"],
            projection_dim=r["vision_width"],
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=r["text_width"], intermediate_size=r["text_mlp"],
            num_hidden_layers=r["text_layers"], num_attention_heads=r["text_heads"],
            num_key_value_heads=r["text_kv_heads"], head_dim=r["head_dim"], max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
    )


def new_tiny_llava(recipe: str = "llava") -> tuple[Any, Any]:
    """A freshly initialised ``(LlavaForConditionalGeneration, LlavaProcessor)`` of ``recipe``."""
    if recipe not in RECIPES:
        raise ValueError(f"no tiny model recipe for {recipe!r}; known: {', '.join(RECIPES)}")
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = tiny_tokenizer()
    processor = LlavaProcessor(
        image_processor=_image_processor(bool(RECIPES[recipe].get("pad_to_square", 0))),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    config = recipe_config(recipe, tokenizer)
    torch.manual_seed(_SEED)
    model = LlavaForConditionalGeneration(config).eval()
    if recipe not in TRAINED:  # a recipe that is trained starts from transformers' own initialisation
        randomize_weights(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


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


def _image_processor(pad_to_square: bool) -> Any:
    """CLIP preprocessing at 336 px. ``pad_to_square``: LLaVA-1.5's own preprocessing (pad with
    the mean colour, then resize), which never cuts content off; else CLIP's resize + centre crop."""
    kwargs = dict(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    try:
        import torchvision  # noqa: F401  (the default processors need it)
        from transformers import CLIPImageProcessor, LlavaImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
        from transformers import LlavaImageProcessorPil as LlavaImageProcessor
    return LlavaImageProcessor(do_pad=True, **kwargs) if pad_to_square else CLIPImageProcessor(**kwargs)


def save_checkpoint(model: Any, processor: Any, out: Path) -> Path:
    """``save_pretrained`` the model and its processor (or a tuple of processor parts) into
    ``out`` atomically, so concurrent builders are safe (an existing ``out`` is kept)."""

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        for part in processor if isinstance(processor, tuple) else (processor,):
            part.save_pretrained(tmp)

    return materialize(out, save)


def build_tiny_llava(out: Path, recipe: str = "llava") -> Path:
    """Build and save the random-weight tiny LLaVA checkpoint of ``recipe``."""
    model, processor = new_tiny_llava(recipe)
    return save_checkpoint(model, processor, out)


def build_family(recipe: str, out: Path) -> Path:
    """Build and save another family's tiny checkpoint (``FAMILY_BUILDERS``)."""
    module, function = FAMILY_BUILDERS[recipe].split(":")
    return save_checkpoint(*getattr(importlib.import_module(module), function)(), out)


def main() -> None:
    parser = argparse.ArgumentParser(description="Build a tiny offline checkpoint")
    recipes = [r for r in [*RECIPES, *FAMILY_BUILDERS] if r not in TRAINED]
    parser.add_argument("--recipe", choices=recipes, default="llava")
    parser.add_argument("--out", type=Path, default=None, help="directory (default: the cache)")
    args = parser.parse_args()
    if args.out is None:
        print(tiny_checkpoint(args.recipe))
    else:
        build = build_family if args.recipe in FAMILY_BUILDERS else lambda r, o: build_tiny_llava(o, r)
        print(build(args.recipe, args.out))


if __name__ == "__main__":
    main()
