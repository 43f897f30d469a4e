"""``tiny:qwen3_5``: a real Qwen3.5 with small shapes, built offline like ``tiny:qwen3_vl``.

``Qwen3_5ForConditionalGeneration``, Qwen2-VL's image processor (which Qwen3.5 uses, as
Qwen3-VL) and ``tiny:qwen2_5_vl``'s tokenizer, with Qwen3.5's geometry: the vision side is
Qwen3-VL's without DeepStack (16 px patches, 2 x 2 merge, temporal patch 2, a learned position
grid resampled to each image, one merger), and a hybrid decoder: Gated DeltaNet (linear
attention, a short convolution and a recurrent state per sequence) in three of every four
layers, gated full attention with a KV cache in the fourth (``full_attention_interval`` 4), with
partial interleaved 3-D M-RoPE (a quarter of each head's dims rotate, as the 9B's 64 of 256).
Tiny widths: vision 64 x 4 blocks, LLM 256 x 4 layers (attention GQA 4/2, head_dim 64;
DeltaNet 2 key heads and 4 value heads of 128, the head size vLLM's CPU kernel takes). Images bounded as ``tiny:qwen3_vl``. Random,
seeded weights.
"""

from __future__ import annotations

from typing import Any

from .common import SEED, randomize_weights
from .qwen2_5_vl import qwen_image_processor, qwen_tokenizer


def new_tiny_qwen3_5() -> tuple[Any, tuple[Any, Any]]:
    """A freshly initialised, seeded ``(Qwen3_5ForConditionalGeneration, (tokenizer, image processor))``."""
    import torch
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    tokenizer = qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3_5Config(
        vision_config={
            "depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 256,
            "num_position_embeddings": 64,
        },
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
            "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 4096,
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4,
            "mamba_ssm_dtype": "float32",  # the DeltaNet state's dtype in vLLM, as the published configs
            # 16 of 64 dims rotate: 8 frequencies, split 3/3/2 over t, h, w (the 9B's 11/11/10 of 32).
            "partial_rotary_factor": 0.25,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2],
                                "mrope_interleaved": True, "partial_rotary_factor": 0.25},
            "bos_token_id": None, "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<|endoftext|>"),
        },
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    image_processor = qwen_image_processor(
        size={"shortest_edge": 64 * 64, "longest_edge": 512 * 512}, patch_size=16, merge_size=2,
        temporal_patch_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    torch.manual_seed(SEED)
    model = Qwen3_5ForConditionalGeneration(config).eval()
    randomize_weights(model, {"visual.merger": 0.1, "visual": 0.02})
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, (tokenizer, image_processor)
