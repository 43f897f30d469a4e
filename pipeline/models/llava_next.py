"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): every transformers touchpoint of the family.

Prepare (CPU): the image processor without rescale/normalise: uint8 views and the image size.
Encode (anyres, as the stock model does it): the image processor picks the best grid from
``image_grid_pinpoints`` and cuts the image into a base view (the whole image at 336 px) plus
tiles; CLIP runs on every view; the selected hidden layer goes through the projector; the
model's own ``pack_image_features`` unpads the tiles' feature map to the image's aspect ratio
and appends the ``image_newline`` embedding at the end of each row. That packed sequence is
what the LLM would receive and is what ``visual_tokens_in`` counts: for LLaVA-v1.6 from 1032
(small portrait) up to 2928 tokens (a square image: 576 base + a 48 x 48 tile grid, nothing
unpadded, + 48 newlines; the paper's "2880" is 5 x 576 without the newlines).

Pruning decision: every packed token is a candidate, newline tokens included (as DivPrune
does). The LLM then receives exactly the kept tokens, in their packed order, so
``visual_tokens_kept`` is what it sees and keeping everything is the stock model (tested).
CDPruner instead always keeps the newlines (the budget then understates what the LLM gets);
VisionZip drops them (keep-all then differs from stock). All newline tokens are one vector,
so ResPrune's residual rule keeps at most one of them while the kept tokens span less than the
features' rank (past it every token counts as spanned and the gate alone orders the rest).

Seed scores: CLS attention, as for LLaVA-1.5, computed per view (the base view and each tile
have their own CLS), and carried through the same packing as the features, so each token
keeps the score of its own patch in its own view. Scores are not renormalised across views:
each view's CLS row is its own softmax (summing to one with CLS itself), so every view is
already on one scale and a patch's score says how much its own view's CLS attends to it; any
reweighting (per view count, base vs tiles) would be a choice the paper does not make. Newline
tokens score 0: a newline is never the seed (nor a ``score_topk`` pick before real patches).

Decode is LLaVA-1.5's (``LlavaAdapter.hf_inputs``): the kept tokens replace the single
``<image>`` placeholder and positions are contiguous, as in the stock model. No payload.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import AutoConfig, LlavaNextForConditionalGeneration
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from pipeline.cost.flops import ModelShapes

from .base import EncodedImages, Prepared
from .llava import LlavaAdapter

if TYPE_CHECKING:
    from PIL import Image

    from pipeline.config import ModelConfig


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_types = ("llava_next",)
    model_class = LlavaNextForConditionalGeneration
    default_alpha = 0.75  # the paper's setting for LLaVA-1.5 and LLaVA-NeXT

    @staticmethod
    def shapes(config: object) -> ModelShapes:
        """LLaVA-1.5's per view: the same CLIP tower and projector (the newline embedding costs
        no FLOPs); the views are counted from ``encoder_patches``, not from the shapes."""
        return dataclasses.replace(LlavaAdapter.shapes(config), family="llava_next")

    @staticmethod
    def token_counts(path: str, cfg: ModelConfig, width: int, height: int) -> tuple[int, int]:
        """The processor's own arithmetic (``LlavaNextProcessor._get_number_of_features``): base
        view + best-fit grid of tiles, unpadded to the image's aspect ratio, a newline per row."""
        config = AutoConfig.from_pretrained(path)
        view, patch = config.vision_config.image_size, config.vision_config.patch_size
        side = view // patch
        best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
        rows, cols = side * (best_h // view), side * (best_w // view)
        if width / height > cols / rows:  # wider than the grid: padding above and below is cut
            rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
        else:
            cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
        base = side * side + (config.vision_feature_select_strategy == "full")
        views = 1 + (best_h // view) * (best_w // view)
        return base + rows * cols + rows, views * side * side

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """The tiles' canvas: the best-fit resolution of ``image_grid_pinpoints``, aspect kept."""
        best_h, best_w = select_best_resolution((height, width), self.image_processor.image_grid_pinpoints)
        scale = min(best_w / width, best_h / height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def prepare_image(self, image: Image.Image) -> Prepared:
        """``{"pixels": uint8 [V, 3, S, S] (the base view, then the tiles), "image_size": [h, w]}``."""
        out = self.image_processor(images=[image], do_rescale=False, do_normalize=False, return_tensors="np")
        return {"pixels": out["pixel_values"][0], "image_size": np.asarray(out["image_sizes"][0], dtype=np.int64)}

    @torch.inference_mode()
    def encode_prepared(self, prepared: list[Prepared]) -> EncodedImages:
        image_sizes = torch.stack([torch.as_tensor(p["image_size"]) for p in prepared])  # (height, width) per image
        config = self.core.config
        views = [  # base view + tiles, per image
            image_size_to_num_patches(s, config.image_grid_pinpoints, patch_size=config.vision_config.image_size)
            for s in image_sizes
        ]
        if views != [len(p["pixels"]) for p in prepared]:
            raise ValueError(f"prepared views {[len(p['pixels']) for p in prepared]} are not the grid's {views}")
        pixels = self.pixel_lut(torch.cat([torch.as_tensor(p["pixels"]) for p in prepared]), self.dtype)
        features, cls_attention = self.encode_views(pixels)
        newline = self.core.image_newline.float()
        packed, _ = self.core.pack_image_features(
            list(features.split(views)), image_sizes, self.select_strategy, image_newline=newline
        )
        # The same packing on a one-channel map keeps every score next to its token; newlines get 0.
        scores, _ = self.core.pack_image_features(
            list(cls_attention.unsqueeze(-1).split(views)), image_sizes, self.select_strategy,
            image_newline=cls_attention.new_zeros(1),
        )
        per_view = pixels.shape[-2] * pixels.shape[-1] // self.vision_tower.config.patch_size**2
        return EncodedImages(
            features=[f.float() for f in packed], seed_scores=[s.squeeze(-1) for s in scores],
            encoder_patches=[n * per_view for n in views], payloads=[{} for _ in prepared],
        )
