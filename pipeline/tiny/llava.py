"""``tiny:llava`` and its siblings: real LLaVA-1.5 checkpoints with small shapes, built offline.

Real transformers classes with small shapes: a CLIP vision tower at 336 px / 14 px patches
(576 patch tokens plus CLS, like LLaVA-1.5), the LLaVA projector, a small Llama, a BPE
tokenizer trained here with ``tokenizers`` (``common.tiny_tokenizer``), the real image processor
and the LLaVA-1.5 chat template. Saved with ``save_pretrained`` and loaded back through
``from_pretrained(path)``, the same code path as a hub checkpoint. Deterministic (seeded).

Recipes (``RECIPES``; same classes, tokenizer, chat template and seed for all):

- ``tiny:llava``: CLIP width 64 x 3 layers, Llama width 256 x 2 layers. Tests and the demo.
- ``tiny:llava-bench``: CLIP width 256 x 4 layers, Llama width 1024 x 8 layers (MLP 2816,
  16 heads). CPU-sized, with LLaVA-1.5-7B's LLM-to-vision FLOP ratio (~20.9 vs ~20.2 at 576
  visual + 42 text tokens), so pruning speed-ups on it mean what they would on the real model.
- ``tiny:llava-shapes``: trained, not random, to answer questions about the shapes world
  (``pipeline.tiny.shapes_world``) by ``jobs/train_tiny_vlm.py`` from transformers' own
  initialisation; the committed checkpoint in ``pipeline/tiny/checkpoints/`` (95 % on short
  questions and caption object F1 0.90-0.91 held-out, every token kept; see the README), never
  built at run time. Its image processor pads to square as LLaVA-1.5 does. The embedded default
  (``configs/local.yaml``).
"""

from __future__ import annotations

from typing import Any

from .common import SEED, randomize_weights, tiny_tokenizer

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), as in llava-hf checkpoints.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

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
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config).eval()
    if recipe not in TRAINED:  # a recipe that is trained starts from transformers' own initialisation
        randomize_weights(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


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
