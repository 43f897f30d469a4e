"""LLaVA-1.5 (``LlavaForConditionalGeneration``): every transformers touchpoint of the family.

Prepare (CPU): the image processor's resize and centre crop (or LLaVA's pad to square, then
resize) as uint8 [1, 3, S, S]; rescale and normalise run on the device (``PixelLUT``).
Encode: CLIP vision tower (eager attention, so CLS attention probabilities are available)
-> hidden layer ``vision_feature_layer`` (-2), CLS dropped -> projector -> [576, D].
Seed scores: attention from CLS to each patch in the layer that produces that hidden state,
mean over heads.
Decode: the chat-templated prompt is tokenized with its single ``<image>`` token; the kept
visual tokens (ascending spatial order) replace that token; the HF engine's ``generate`` runs on
these ``inputs_embeds``. Positions are contiguous, as in the original LLaVA pruning codebases.
No payload: the kept tokens are all the LLM needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, LlavaForConditionalGeneration

from pipeline.cost.flops import ModelShapes, VisionShape

from .base import (
    DecodeRequest,
    EncodedImages,
    HFInputs,
    Part,
    PixelLUT,
    Prepared,
    VisionLanguageAdapter,
    decoder_shape,
    word_embeddings,
)

if TYPE_CHECKING:
    from PIL import Image

    from pipeline.config import ModelConfig


class LlavaAdapter(VisionLanguageAdapter):
    family = "llava"
    model_types = ("llava",)
    model_class: ClassVar[type] = LlavaForConditionalGeneration

    vllm_architecture = "ResPruneLlavaForCausalLM"  # contiguous positions, as in the stock model

    def __init__(self, cfg: ModelConfig, path: str, part: Part) -> None:
        super().__init__(cfg, path, part)
        self.config = AutoConfig.from_pretrained(path)
        self.image_token_id: int = self.config.image_token_id
        # The PIL backend, the processor's reference: what the CPU stage runs, on every node.
        self.image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        if part == "image":
            return
        self.processor = AutoProcessor.from_pretrained(path)
        self.tokenizer = self.processor.tokenizer
        if part == "prompt":
            return
        model = self.model_class.from_pretrained(
            path, dtype=self.dtype, attn_implementation={"vision_config": "eager"}
        ).eval()
        config = model.config
        self.feature_layer: int | list[int] = config.vision_feature_layer
        self.select_strategy: str = config.vision_feature_select_strategy
        self.embed = model.get_input_embeddings().to(self.device)
        if part == "vision":
            # Keep only what encoding needs (vision tower, projector, and for LLaVA-NeXT the
            # newline embedding and feature packing); the LLM's weights are freed with `model`.
            del model.model.language_model
            self.core = model.model.to(self.device)
            self.vision_tower = self.core.vision_tower
            self.projector = self.core.multi_modal_projector
            self.pixel_lut = PixelLUT(self.image_processor, self.device)
        else:
            self.model = model.to(self.device)

    @staticmethod
    def shapes(config: object) -> ModelShapes:
        """CLIP runs all its layers (``vision_feature_layer`` only picks which hidden state is
        used); the projector is linear_1 (vision width x feature layers -> LLM width) and
        linear_2 (LLM width -> LLM width)."""
        vc, tc = config.vision_config, config.text_config
        layers = config.vision_feature_layer
        n_feature_layers = 1 if isinstance(layers, int) else len(layers)
        return ModelShapes(
            family="llava",
            vision=VisionShape(
                image_size=vc.image_size, patch_size=vc.patch_size, channels=vc.num_channels,
                layers=vc.num_hidden_layers, width=vc.hidden_size, mlp_width=vc.intermediate_size,
                mlp_matrices=2, class_tokens=1,
                projector=(vc.hidden_size * n_feature_layers, tc.hidden_size, tc.hidden_size),
            ),
            language=decoder_shape(tc),
        )

    @staticmethod
    def token_counts(path: str, cfg: ModelConfig, width: int, height: int) -> tuple[int, int]:
        """Every image is resized to one square view: the size does not matter."""
        config = AutoConfig.from_pretrained(path)
        vc = config.vision_config
        patches = (vc.image_size // vc.patch_size) ** 2
        return patches + (config.vision_feature_select_strategy == "full"), patches

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """The shortest edge to ``size`` (CLIP, then cropped), or with ``do_pad`` (LLaVA's pad to
        square) the longest edge to the crop size."""
        ip = self.image_processor
        if getattr(ip, "do_pad", False):
            scale = ip.crop_size["height"] / max(width, height)
        else:
            scale = ip.size["shortest_edge"] / min(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def prepare_image(self, image: Image.Image) -> Prepared:
        """``{"pixels": uint8 [1, 3, S, S]}``: the processor with rescale and normalise left out."""
        out = self.image_processor(images=[image], do_rescale=False, do_normalize=False, return_tensors="np")
        return {"pixels": out["pixel_values"]}

    @torch.inference_mode()
    def encode_prepared(self, prepared: list[Prepared]) -> EncodedImages:
        pixels = self.pixel_lut(torch.cat([torch.as_tensor(p["pixels"]) for p in prepared]), self.dtype)
        features, cls_attention = self.encode_views(pixels)
        patches = pixels.shape[-2] * pixels.shape[-1] // self.vision_tower.config.patch_size**2
        return EncodedImages(
            features=list(features), seed_scores=list(cls_attention), encoder_patches=[patches] * len(prepared),
            payloads=[{} for _ in prepared],
        )

    def encode_views(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Square views [V, 3, S, S] -> projected tokens [V, T, D] and each token's CLS attention
        [V, T] (float32): the selected hidden layer(s), CLS dropped unless the strategy is "full"."""
        out = self.vision_tower(
            pixels.to(self.device, self.dtype), output_hidden_states=True, output_attentions=True, return_dict=True
        )
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        first_patch = 1 if self.select_strategy == "default" else 0
        hidden = torch.cat([out.hidden_states[i][:, first_patch:] for i in layers], dim=-1)
        features = self.projector(hidden).float()
        # attentions[k] feeds hidden_states[k + 1]; hidden_states[-1] comes out of attentions[-1].
        seed_layer = layers[-1] if layers[-1] < 0 else layers[-1] - 1
        cls_attention = out.attentions[seed_layer][:, :, 0, 1:].mean(dim=1).float()
        if first_patch == 0:  # "full" strategy keeps CLS as a token; it gets no score of its own
            cls_attention = torch.cat([cls_attention.new_zeros((len(pixels), 1)), cls_attention], dim=1)
        return features, cls_attention

    @torch.inference_mode()
    def embed_words(self, words: list[list[str]]) -> list[Tensor]:
        return word_embeddings(self.tokenizer, self.embed, words)

    def chat_text(self, prompt: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    @torch.inference_mode()
    def hf_inputs(self, requests: list[DecodeRequest]) -> HFInputs:
        """Per row the prompt's embeddings with the kept tokens in place of its ``<image>`` token."""
        rows = []
        for r in requests:
            ids = torch.tensor(self.prompt_ids(r.prompt), device=self.device)
            p = int((ids == self.image_token_id).nonzero()[0])
            emb = self.embed(ids)
            rows.append(torch.cat([emb[:p], r.visual.to(self.device, emb.dtype), emb[p + 1 :]]))
        return HFInputs(rows)
