"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``): every transformers touchpoint of the family.

The vision side is Qwen3-VL's without DeepStack (16 px patches, 2 x 2 merge, one merger; no
CLS, so ResPrune seeds on the largest-norm token), the image processor is Qwen2-VL's, and the
text after an image resumes where the model's own ``get_rope_index`` puts it (interleaved
M-RoPE over a quarter of each head's dims). So the adapter is ``Qwen2_5_VLAdapter`` (image
processor, resize rule, prompt, the full sequence's positions from the loaded model, the kept
features in the placeholders' place as ``inputs_embeds``) with the vision tower's shapes and
the model class overridden.

The decoder is hybrid: Gated DeltaNet layers (linear attention: a short convolution and a
fixed-size recurrent state per sequence, no KV cache) and, every ``full_attention_interval``
layers, gated full attention with a KV cache. ``generate`` builds the hybrid cache from the
config; left padding is exact (the DeltaNet layers zero padded positions, and nothing has a
bias), so rows batch as for Qwen2.5-VL.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from transformers import Qwen3_5ForConditionalGeneration

from pipeline.cost.flops import LinearAttentionShape, ModelShapes, VisionShape

from .base import decoder_shape
from .qwen2_5_vl import Qwen2_5_VLAdapter


class Qwen3_5Adapter(Qwen2_5_VLAdapter):
    family = "qwen3_5"
    model_types = ("qwen3_5",)
    # No CLS and dense merged tokens, as Qwen2.5-VL and Qwen3-VL: their paper setting.
    default_alpha = 0.3

    vllm_architecture = "ResPruneQwen3_5ForCausalLM"
    model_class = Qwen3_5ForConditionalGeneration

    def vllm_options(self) -> dict[str, Any]:
        """The checkpoint's ``mamba_ssm_dtype`` (float32 in the published configs) for the DeltaNet
        state: vLLM reads it only for its own Qwen3.5 class names, else the state would be kept in
        the model's dtype (bf16), which drifts from what the model was run with."""
        dtype = getattr(self.config.text_config, "mamba_ssm_dtype", None)
        return {"mamba_ssm_cache_dtype": dtype} if dtype else {}

    @staticmethod
    def shapes(config: object) -> ModelShapes:
        """Vision: Qwen3-VL's blocks (plain MLP, full attention over every patch, a Conv3d patch
        embedding over ``temporal_patch_size`` frames) and one merger. Language: the hybrid
        decoder, its attention layers' q_proj doubled by the output gate, and its Gated DeltaNet
        layers (``layer_types``)."""
        vc, tc = config.vision_config, config.text_config
        merged = vc.hidden_size * vc.spatial_merge_size**2
        return ModelShapes(
            family="qwen3_5",
            vision=VisionShape(
                image_size=0, patch_size=vc.patch_size, channels=vc.in_channels, layers=vc.depth,
                width=vc.hidden_size, mlp_width=vc.intermediate_size, mlp_matrices=2, class_tokens=0,
                projector=(merged, merged, vc.out_hidden_size), temporal_patch=vc.temporal_patch_size,
                spatial_merge=vc.spatial_merge_size,
            ),
            language=replace(
                decoder_shape(tc), attention_output_gate=True,
                linear=LinearAttentionShape(
                    layers=tc.layer_types.count("linear_attention"), key_heads=tc.linear_num_key_heads,
                    key_dim=tc.linear_key_head_dim, value_heads=tc.linear_num_value_heads,
                    value_dim=tc.linear_value_head_dim, conv_kernel=tc.linear_conv_kernel_dim,
                ),
            ),
        )
