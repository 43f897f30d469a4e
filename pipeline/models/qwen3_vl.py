"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): every transformers touchpoint of the family.

The adapter is ``Qwen2_5_VLAdapter`` (image processor, resize rule, prompt, the full sequence's
positions from the loaded model's own ``get_rope_index``) with what differs overridden: the vision
tower's shapes (16 px patches, full attention, DeepStack mergers) and DeepStack in the payload,
the HF inputs and the vLLM request.

Encode: dynamic resolution as Qwen2.5-VL (``qwen2_5_vl.py``), with 16 px patches (the image is
resized to a multiple of 32 px within ``[min_pixels, max_pixels]``), a 2 x 2 merge, and full
attention in every vision block. No CLS: no seed scores (ResPrune seeds on the largest-norm
token). DeepStack: the vision blocks in ``deepstack_visual_indexes`` each feed their own merger,
so an image gives its main tokens [N, D] and one more [N, D] per level, in the same merged-grid
order. The stock LLM adds level l to its hidden states at the visual positions after decoder
layer l. The payload is Qwen2.5-VL's (``grid_thw``) plus the levels, ``deepstack`` [L, N, D];
``kept_payload`` keeps the SAME indices in every level as in the main tokens, and the decode
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

from pipeline.cost.flops import ModelShapes, VisionShape

from .base import DecodeRequest, HFInputs, Payload, decoder_shape
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

    def image_payloads(self, grid: Tensor, vision_output: object) -> list[Payload]:
        """Qwen2.5-VL's grid plus ``deepstack``: ``deepstack_features`` (per level, per image
        [N_i, D]) as per image [L, N_i, D]."""
        levels = vision_output.deepstack_features
        return [
            {**payload, "deepstack": torch.stack([level[i] for level in levels]).float()}
            for i, payload in enumerate(super().image_payloads(grid, vision_output))
        ]

    def kept_payload(self, payload: Payload, kept: Tensor) -> Payload:
        """The same indices in every DeepStack level: level l's row j belongs to kept token j."""
        return {**payload, "deepstack": payload["deepstack"][:, kept]}

    def deepstack(self, request: DecodeRequest) -> Tensor:
        """The row's kept DeepStack rows [L, K, D], checked against its kept tokens."""
        levels = len(self.config.vision_config.deepstack_visual_indexes)
        rows = request.payload.get("deepstack")
        if rows is None:
            raise ValueError("Qwen3-VL decodes from the kept tokens AND their DeepStack levels: deepstack is missing")
        if len(request.visual) != len(request.kept_indices) or tuple(rows.shape) != (levels, *request.visual.shape):
            raise ValueError(f"a row's DeepStack levels must be [{levels}, {len(request.kept_indices)}, D] like its "
                             "kept tokens")
        return rows

    @torch.inference_mode()
    def hf_inputs(self, requests: list[DecodeRequest]) -> HFInputs:
        """Per row the pruned prompt's token ids (K placeholders) and 3-D position ids; the kept
        features and DeepStack rows go in as pre-encoded vision output, which the model scatters
        into the placeholders itself."""
        deepstack = [self.deepstack(r) for r in requests]
        rows = [self.pruned_sequence(r.prompt, r.kept_indices, self.grid(r))[:2] for r in requests]
        dtype = self.embed.weight.dtype
        # Pre-encoded vision output in the layout get_image_features returns: per image, in batch
        # order, which is the order the model fills placeholders (and DeepStack rows) over (batch, seq).
        encoded = BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(r.visual.to(self.device, dtype) for r in requests),
            deepstack_features=[
                tuple(d[level].to(self.device, dtype) for d in deepstack)
                for level in range(len(self.config.vision_config.deepstack_visual_indexes))
            ],
        )
        return HFInputs([ids for ids, _ in rows], positions=[p for _, p in rows],
                        extra={"mm_encoder_outputs": {"image": encoded}})

    def vllm_request(self, request: DecodeRequest) -> dict:
        """Qwen2.5-VL's request (the kept tokens, the grid and their indices in it) plus their
        DeepStack rows, [1, L, K, D]."""
        out = super().vllm_request(request)
        out["multi_modal_data"]["image"]["deepstack_embeds"] = self.deepstack(request).to(self.dtype)[None]
        return out
