"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): every transformers touchpoint of the family.

The adapter is ``Qwen2_5_VLAdapter`` (image processor, resize rule, prompt, the full sequence's
positions from the loaded model's own ``get_rope_index``) with what differs overridden: the vision
tower's shapes (16 px patches, full attention, DeepStack mergers) and DeepStack in ``encode``,
``generate`` and the vLLM request.

Encode: dynamic resolution as Qwen2.5-VL (``qwen2_5_vl.py``), with 16 px patches (the image is
resized to a multiple of 32 px within ``[min_pixels, max_pixels]``), a 2 x 2 merge, and full
attention in every vision block. No CLS: no seed scores (ResPrune seeds on the largest-norm
token). DeepStack: the vision blocks in ``deepstack_visual_indexes`` each feed their own merger,
so an image gives its main tokens [N, D] and one more [N, D] per level, in the same merged-grid
order. The stock LLM adds level l to its hidden states at the visual positions after decoder
layer l. ``encode`` returns the levels as ``deepstack`` [L, N, D]; the encode stage keeps the
SAME indices in every level as in the main tokens (``EncodedImages.deepstack``), and the decode
side hands those kept rows to the LLM at the kept tokens' positions. Dropping them would still
give fluent answers, only worse, so the tests compare what each layer receives with the stock model.

Decode keeps the true positions, as for Qwen2.5-VL: the full sequence (every placeholder) goes
through the model's own ``get_rope_index`` (Qwen3-VL's, whose M-RoPE is interleaved across the
rotary frequencies by the model's rotary embedding and whose text after an image resumes at
start + max(h, w) / merge), and the pruned sequence keeps the columns of its text and kept
tokens. The rows go to the stock ``model.generate`` as token ids (K placeholders each,
left-padded) with these ``position_ids`` [3, B, L] and the kept features as pre-encoded vision
output (``mm_encoder_outputs``: main tokens and every DeepStack level), which the model itself
scatters into the placeholders and adds in its first layers; transformers feeds each new token at
the row's last position + 1, i.e. where the unpruned sequence would continue.

As for Qwen2.5-VL, the tokenizer and image processor are loaded rather than ``Qwen3VLProcessor``
(which also wants a video processor, and so torchvision).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from pipeline.config import GenerationConfig
from pipeline.cost.flops import ModelShapes, VisionShape

from .base import Generation, cut_at_eos, decoder_shape, generate_options, left_padded_positions
from .qwen2_5_vl import Qwen2_5_VLAdapter


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    # No CLS and dense merged tokens, as Qwen2.5-VL: its paper setting (README, "Models").
    default_alpha = 0.3

    # Kept tokens at their full-grid positions, and their DeepStack rows added in the first layers.
    vllm_architecture = "ResPruneQwen3VLForCausalLM"
    model_class = Qwen3VLForConditionalGeneration

    @staticmethod
    def shapes(config: object) -> ModelShapes:
        """Vision: plain-MLP blocks with full attention over every patch, a Conv3d patch embedding
        over ``temporal_patch_size`` frames, and ``1 + len(deepstack_visual_indexes)`` mergers
        (the main one and one per DeepStack level), each an MLP over groups of merge^2 patches."""
        vc, tc = config.vision_config, config.text_config
        merged = vc.hidden_size * vc.spatial_merge_size**2
        return ModelShapes(
            family="qwen3_vl",
            vision=VisionShape(
                image_size=0, patch_size=vc.patch_size, channels=vc.in_channels, layers=vc.depth,
                width=vc.hidden_size, mlp_width=vc.intermediate_size, mlp_matrices=2, class_tokens=0,
                projector=(merged, merged, vc.out_hidden_size), projectors=1 + len(vc.deepstack_visual_indexes),
                temporal_patch=vc.temporal_patch_size, spatial_merge=vc.spatial_merge_size,
            ),
            language=decoder_shape(tc),
        )

    def deepstack_levels(self, vision_output: object) -> list[Tensor]:
        """``deepstack_features`` (per level, per image [N_i, D]) as per image [L, N_i, D]."""
        levels = vision_output.deepstack_features
        return [torch.stack([level[i] for level in levels]).float() for i in range(len(levels[0]))]

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str],
        visual: list[Tensor],
        kept_indices: list[Tensor],
        layouts: list[list[int]],
        gen: GenerationConfig,
        deepstack: list[Tensor] | None = None,
    ) -> list[Generation]:
        levels = len(self.config.vision_config.deepstack_visual_indexes)
        if deepstack is None or len(deepstack) != len(visual):
            raise ValueError("Qwen3-VL decodes from the kept tokens AND their DeepStack levels: deepstack is missing")
        for v, d, k in zip(visual, deepstack, kept_indices, strict=True):
            if len(v) != len(k) or tuple(d.shape) != (levels, *v.shape):
                raise ValueError(f"a row's DeepStack levels must be [{levels}, {len(k)}, D] like its kept tokens")
        rows = [self.pruned_sequence(*args)[:2] for args in zip(prompts, kept_indices, layouts, strict=True)]
        width = max(len(ids) for ids, _ in rows)
        pad_id = self.tokenizer.pad_token_id
        ids = torch.stack([torch.cat([i.new_full((width - len(i),), pad_id), i]) for i, _ in rows])
        mask = torch.stack([torch.arange(width, device=self.device) >= width - len(i) for i, _ in rows]).long()
        positions = left_padded_positions([p for _, p in rows], width)
        dtype = self.embed.weight.dtype
        # Pre-encoded vision output in the layout get_image_features returns: per image, in batch
        # order, which is the order the model fills placeholders (and DeepStack rows) over (batch, seq).
        encoded = BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(v.to(self.device, dtype) for v in visual),
            deepstack_features=[tuple(d[level].to(self.device, dtype) for d in deepstack) for level in range(levels)],
        )
        new = self.model.generate(
            input_ids=ids, attention_mask=mask, position_ids=positions, mm_encoder_outputs={"image": encoded},
            pad_token_id=pad_id, **generate_options(gen),
        )
        return cut_at_eos(self.model, self.tokenizer, [len(i) for i, _ in rows], new[:, width:])

    def vllm_request(
        self, prompt: str, visual: Tensor, kept_indices: Tensor, layout: list[int], deepstack: Tensor | None = None
    ) -> dict:
        """Qwen2.5-VL's request (the kept tokens, the grid and their indices in it) plus their
        DeepStack rows, [1, L, K, D]."""
        if deepstack is None:
            raise ValueError("Qwen3-VL decodes from the kept tokens AND their DeepStack levels: deepstack is missing")
        request = super().vllm_request(prompt, visual, kept_indices, layout)
        request["multi_modal_data"]["image"]["deepstack_embeds"] = deepstack[None]
        return request
