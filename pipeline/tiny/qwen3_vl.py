"""``tiny:qwen3_vl``: a real Qwen3-VL with small shapes, built offline like ``tiny:llava``.

``Qwen3VLForConditionalGeneration``, Qwen2-VL's image processor (which Qwen3-VL uses) and a
tokenizer, with Qwen3-VL's geometry: 16 px patches, 2 x 2 spatial merge, temporal patch 2, a
learned position grid bilinearly resampled to each image, full attention in every vision block,
DeepStack (vision blocks 1 and 2 each feed their own merger, whose tokens are added to the first
two LLM layers' hidden states at the visual positions) and interleaved 3-D M-RoPE in the LLM.
Tiny widths: vision 64 x 4 blocks, LLM 256 x 3 layers (GQA 4/2, head_dim 64, QK-norm,
mrope_section 12/10/10, the 8B's 24/20/20 halved with head_dim). The image processor bounds
images to 64 x 64 .. 512 x 512 pixels (at most 256 visual tokens) unless the job's
``model.min_pixels`` / ``max_pixels`` say otherwise. Tokenizer and chat template are
``tiny:qwen2_5_vl``'s (Qwen3-VL's template, like it, has no default system prompt). Random,
seeded weights whose answers depend on the image and on the DeepStack features.
"""

from __future__ import annotations

from typing import Any

from .common import SEED, randomize_weights
from .qwen2_5_vl import qwen_image_processor, qwen_tokenizer


def new_tiny_qwen3_vl() -> tuple[Any, tuple[Any, Any]]:
    """A freshly initialised, seeded ``(Qwen3VLForConditionalGeneration, (tokenizer, image processor))``."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        vision_config={
            "depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 256,
            "num_position_embeddings": 64, "deepstack_visual_indexes": [1, 2],
        },
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [12, 10, 10],
                                "mrope_interleaved": True},
            "bos_token_id": None, "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<|endoftext|>"),
        },
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    image_processor = qwen_image_processor(
        size={"shortest_edge": 64 * 64, "longest_edge": 512 * 512}, patch_size=16, merge_size=2,
        temporal_patch_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    # Saved as tokenizer + image processor, as tiny:qwen2_5_vl (Qwen3VLProcessor wants torchvision).
    torch.manual_seed(SEED)
    model = Qwen3VLForConditionalGeneration(config).eval()
    # DeepStack mergers as strong as the main one, so dropping their tokens changes the answers.
    randomize_weights(model, {"deepstack_merger": 0.1, "visual.merger": 0.1, "visual": 0.02})
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, (tokenizer, image_processor)
