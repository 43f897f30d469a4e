"""``tiny:qwen2_5_vl``: a real Qwen2.5-VL with small shapes, built offline like ``tiny:llava``.

``Qwen2_5_VLForConditionalGeneration``, Qwen2-VL's image processor and a tokenizer, with Qwen2.5-VL's geometry
(14 px patches, 2 x 2 spatial merge, temporal patch 2, 112 px attention windows with full
attention in some blocks, 3-D M-RoPE) and tiny widths: vision 64 x 4 blocks (full attention in
blocks 1 and 3), LLM 256 x 2 layers (GQA 4/2, head_dim 64, mrope_section 8/12/12). The image
processor bounds images to 56 x 56 .. 448 x 448 pixels (at most 256 visual tokens) unless the
job's ``model.min_pixels`` / ``max_pixels`` say otherwise. The tokenizer is ``tiny:llava``'s
BPE with Qwen's special tokens and a Qwen-style chat template. Random, seeded weights whose
answers depend on the image.
"""

from __future__ import annotations

from typing import Any

from .common import SEED, randomize_weights, tiny_tokenizer

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer() -> Any:
    """``tiny:llava``'s BPE with Qwen's special tokens and chat template (shared by the Qwen families)."""
    tokenizer = tiny_tokenizer(
        SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def qwen_image_processor(**kwargs: Any) -> Any:
    """Qwen2-VL's image processor (Qwen2.5-VL's and Qwen3-VL's), the PIL one without torchvision."""
    try:
        import torchvision  # noqa: F401  (the default processor needs it)
        from transformers import Qwen2VLImageProcessor
    except ImportError:
        from transformers import Qwen2VLImageProcessorPil as Qwen2VLImageProcessor
    return Qwen2VLImageProcessor(**kwargs)


def new_tiny_qwen2_5_vl() -> tuple[Any, tuple[Any, Any]]:
    """A freshly initialised, seeded ``(Qwen2_5_VLForConditionalGeneration, (tokenizer, image processor))``."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [1, 3],
            "out_hidden_size": 256, "tokens_per_second": 2,
        },
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
            "bos_token_id": None, "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<|endoftext|>"),
        },
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    image_processor = qwen_image_processor(
        size={"shortest_edge": 56 * 56, "longest_edge": 448 * 448}, patch_size=14, merge_size=2, temporal_patch_size=2,
    )
    # Saved as tokenizer + image processor: Qwen2_5_VLProcessor also wants a video processor, which
    # needs torchvision (not installed here); the adapter uses the two parts directly.
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    randomize_weights(model, {"visual.merger": 0.1, "visual": 0.02})
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, (tokenizer, image_processor)
