"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): every transformers touchpoint of the family.

Encode: dynamic resolution. The image processor resizes each image to a multiple of 28 px
within ``[min_pixels, max_pixels]`` (``model.min_pixels`` / ``max_pixels``, else the
checkpoint's processor settings) and cuts it into 14 px patches, ``image_grid_thw = (t, h, w)``;
the vision tower (window attention, full attention in a few blocks) and the 2 x 2 patch merger
give ``t * h * w / 4`` tokens, in the row-major order of the merged grid, which is what the LLM
receives. No CLS token: no seed scores (ResPrune seeds on the largest-norm token).

Prepare (CPU): the processor's resize alone, uint8 [3, h, w] at the multiple-of-28 size (about a
sixth of the float32 patches, which repeat every pixel ``temporal_patch_size`` times). Encode
does rescale/normalise (``PixelLUT``) and the processor's patchify on the device.

Payload: ``{"grid_thw": [t, h, w]}`` (``image_grid_thw``), whole whatever is kept; the kept
indices place the kept tokens in that grid.

Decode keeps the true 3-D M-RoPE positions. The prompt is built as the stock model sees it,
with all ``t * h * w / 4`` image placeholders; the model's own ``get_rope_index`` gives the
(temporal, row, column) position of every token of that FULL sequence; the pruned sequence
keeps the columns of its text tokens and of the kept visual tokens (gaps where tokens were
pruned) and the kept features replace the placeholders that remain. The HF engine left-pads
the rows into one batch (each row's rope index is computed on its own, unpadded; pad columns
get position 0 and are masked out) and ``model.generate`` gets ``inputs_embeds``, the attention
mask and these ``position_ids`` [3, B, L]; transformers keeps user position ids and feeds each
new token at the row's last position + 1 (the model's cached ``rope_deltas`` are not consulted
when position ids are given). The last prompt token is text and keeps its full-sequence
position, so decoding continues exactly where the unpruned sequence would: max position + 1,
i.e. a rope delta of max position + 1 - pruned length. Compacting positions to 1-D or to the
pruned length, as a plain ``inputs_embeds`` call would, silently moves every token after the
image.

The adapter loads the tokenizer and image processor rather than ``Qwen2_5_VLProcessor``: the
processor also wants a video processor, which needs torchvision, and the job never sees video.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.image_utils import SizeDict

from pipeline.cost.flops import ModelShapes, VisionShape

from .base import (
    DecodeRequest,
    EncodedImages,
    HFInputs,
    Part,
    Payload,
    PixelLUT,
    Prepared,
    VisionLanguageAdapter,
    decoder_shape,
    word_embeddings,
)

if TYPE_CHECKING:
    from PIL import Image

    from pipeline.config import ModelConfig


class Qwen2_5_VLAdapter(VisionLanguageAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    default_alpha = 0.3  # the paper's setting: weaker text guidance for Qwen's denser tokens

    # Kept tokens at their full-grid 3-D positions, text after the image shifted as in the full sequence.
    vllm_architecture = "ResPruneQwen2_5_VLForCausalLM"
    model_class = Qwen2_5_VLForConditionalGeneration

    def __init__(self, cfg: ModelConfig, path: str, part: Part) -> None:
        super().__init__(cfg, path, part)
        self.config = AutoConfig.from_pretrained(path)
        self.image_token_id: int = self.config.image_token_id
        self.merge: int = self.config.vision_config.spatial_merge_size
        if part in ("image", "vision"):
            # The PIL backend, the processor's reference: what the CPU stage runs, on every node.
            self.image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
            self.size = pixel_bounds(self.image_processor, cfg)
        if part == "image":
            return
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if part == "prompt":
            return
        model = self.model_class.from_pretrained(path, dtype=self.dtype).eval()
        self.embed = model.get_input_embeddings().to(self.device)
        if part == "vision":
            del model.model.language_model  # encoding needs the vision tower and merger only
            self.core = model.model.to(self.device)
            self.pixel_lut = PixelLUT(self.image_processor, self.device)
        else:
            # Decoding runs on inputs_embeds (features come from the encode stage): the vision
            # tower is never called (the model touches it only for pixel_values), so it is freed.
            del model.model.visual
            self.model = model.to(self.device)

    @staticmethod
    def shapes(config: object) -> ModelShapes:
        """Vision: gated-MLP blocks over every patch, window attention (``window_size`` px
        windows) except in the ``fullatt_block_indexes`` blocks, a Conv3d patch embedding over
        ``temporal_patch_size`` frames, and the merger MLP over groups of merge^2 patches."""
        vc, tc = config.vision_config, config.text_config
        merged = vc.hidden_size * vc.spatial_merge_size**2
        return ModelShapes(
            family="qwen2_5_vl",
            vision=VisionShape(
                image_size=0, patch_size=vc.patch_size, channels=vc.in_channels, layers=vc.depth,
                width=vc.hidden_size, mlp_width=vc.intermediate_size, mlp_matrices=3, class_tokens=0,
                projector=(merged, merged, vc.out_hidden_size), temporal_patch=vc.temporal_patch_size,
                spatial_merge=vc.spatial_merge_size, attention_window=(vc.window_size // vc.patch_size) ** 2,
                full_attention_layers=len(vc.fullatt_block_indexes),
            ),
            language=decoder_shape(tc),
        )

    @staticmethod
    def token_counts(path: str, cfg: ModelConfig, width: int, height: int) -> tuple[int, int]:
        """The image processor's resize rule; a directory with only ``config.json`` uses the
        processor class's defaults for the bounds ``model.min_pixels`` / ``max_pixels`` leave open."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # imports PIL

        config = AutoConfig.from_pretrained(path)
        try:
            processor = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError):
            from transformers import Qwen2VLImageProcessorPil

            processor = Qwen2VLImageProcessorPil()
        size = pixel_bounds(processor, cfg)
        patch, merge = config.vision_config.patch_size, config.vision_config.spatial_merge_size
        h, w = smart_resize(height, width, patch * merge, size["shortest_edge"], size["longest_edge"])
        patches = (h // patch) * (w // patch)
        return patches // merge**2, patches

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """The processor's resize rule (``smart_resize``) at this config's pixel bounds."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = self.image_processor
        h, w = smart_resize(height, width, ip.patch_size * ip.merge_size, self.size["shortest_edge"],
                            self.size["longest_edge"])
        return w, h

    def prepare_image(self, image: Image.Image) -> Prepared:
        """``{"pixels": uint8 [3, h, w]}``: the processor's own resize (to a multiple of patch x
        merge within the pixel bounds), nothing else."""
        ip = self.image_processor
        # A channels-first VIEW: the processor's resize hands PIL channels-last again, so a
        # contiguous copy here would be transposed twice (measured: twice the resize time at 12 MP).
        chw = np.moveaxis(np.asarray(image), -1, 0)
        size = SizeDict(shortest_edge=self.size["shortest_edge"], longest_edge=self.size["longest_edge"])
        return {"pixels": ip.resize(chw, size=size, resample=ip.resample, factor=ip.patch_size * ip.merge_size)}

    def patchify(self, pixels: Tensor) -> tuple[Tensor, list[int]]:
        """Normalised [3, h, w] -> the processor's flat patches [h/p * w/p, 3 * T * p * p] (merge
        groups contiguous, every pixel repeated over the ``temporal_patch_size`` frames: the
        processor's ``patchify``, on the device) and the grid [1, h/p, w/p]."""
        ip = self.image_processor
        p, m, t = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        c, h, w = pixels.shape
        gh, gw = h // p, w // p
        x = pixels.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        x = x.unsqueeze(5).expand(*x.shape[:5], t, p, p)
        return x.reshape(gh * gw, c * t * p * p), [1, gh, gw]

    @torch.inference_mode()
    def encode_prepared(self, prepared: list[Prepared]) -> EncodedImages:
        patches, grids = zip(*(self.patchify(self.pixel_lut(p["pixels"], self.dtype)) for p in prepared), strict=True)
        grid = torch.tensor(grids, dtype=torch.long)
        out = self.core.get_image_features(pixel_values=torch.cat(patches), image_grid_thw=grid.to(self.device))
        return EncodedImages(
            features=[f.float() for f in out.pooler_output], seed_scores=None,
            encoder_patches=grid.prod(dim=-1).tolist(), payloads=self.image_payloads(grid, out),
        )

    def image_payloads(self, grid: Tensor, vision_output: object) -> list[Payload]:
        """Per image its patch grid [t, h, w] (``image_grid_thw``), which places its tokens."""
        return [{"grid_thw": g.clone()} for g in grid.to(torch.long)]

    @staticmethod
    def grid(request: DecodeRequest) -> list[int]:
        """The row's patch grid [t, h, w] from its payload."""
        if "grid_thw" not in request.payload:
            raise ValueError(f"{request.id}: the payload has no grid_thw to place the kept tokens")
        return [int(x) for x in request.payload["grid_thw"].tolist()]

    @torch.inference_mode()
    def embed_words(self, words: list[list[str]]) -> list[Tensor]:
        return word_embeddings(self.tokenizer, self.embed, words)

    def chat_text(self, prompt: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    @torch.inference_mode()
    def pruned_sequence(self, prompt: str, kept_indices: Tensor, grid: list[int]) -> tuple[Tensor, Tensor, int]:
        """One row's pruned prompt: token ids [L] (one image placeholder per kept token), 3-D
        position ids [3, L] and where the kept tokens start. The full sequence (every placeholder,
        as the stock processor builds it) goes through the model's own ``get_rope_index``; the
        pruned one keeps its columns at the text tokens and the kept visual tokens."""
        ids = torch.tensor(self.prompt_ids(prompt), device=self.device)
        start, n = int((ids == self.image_token_id).nonzero()[0]), grid[0] * grid[1] * grid[2] // self.merge**2
        full = torch.cat([ids[:start], ids.new_full((n,), self.image_token_id), ids[start + 1 :]])
        kept = kept_indices.to(self.device)
        if len(kept) and (int(kept.min()) < 0 or int(kept.max()) >= n or (kept.diff() <= 0).any()):
            raise ValueError(f"kept_indices must be ascending indices below {n}")
        positions, _ = self.model.model.get_rope_index(
            full[None], mm_token_type_ids=(full == self.image_token_id).int()[None],
            image_grid_thw=torch.tensor([grid], device=self.device),
        )
        keep = torch.ones(len(full), dtype=torch.bool, device=self.device)
        keep[start : start + n] = False
        keep[start + kept] = True
        return full[keep], positions[:, 0, keep], start

    @torch.inference_mode()
    def prompt_inputs(
        self, prompt: str, visual: Tensor, kept_indices: Tensor, grid: list[int]
    ) -> tuple[Tensor, Tensor]:
        """One row's pruned prompt as embeddings [L, D] (the kept features in the placeholders'
        place) and its 3-D position ids [3, L]."""
        if len(kept_indices) != len(visual):
            raise ValueError(f"kept_indices must be {len(visual)} ascending indices, one per kept token")
        ids, positions, start = self.pruned_sequence(prompt, kept_indices, grid)
        emb = self.embed(ids)
        emb[start : start + len(visual)] = visual.to(self.device, emb.dtype)
        return emb, positions

    @torch.inference_mode()
    def hf_inputs(self, requests: list[DecodeRequest]) -> HFInputs:
        """Per row the pruned prompt's embeddings and 3-D position ids (``prompt_inputs``)."""
        rows = [self.prompt_inputs(r.prompt, r.visual, r.kept_indices, self.grid(r)) for r in requests]
        return HFInputs([e for e, _ in rows], positions=[p for _, p in rows])

    def vllm_request(self, request: DecodeRequest) -> dict:
        """The kept tokens with the grid and their indices in it, from which the vLLM model class
        places them (``kept_mrope_positions``)."""
        out = super().vllm_request(request)
        out["multi_modal_data"]["image"] |= {
            "image_grid_thw": torch.tensor([self.grid(request)]),
            "kept_indices": request.kept_indices.to(torch.long)[None],
        }
        return out


def kept_mrope_positions(
    length: int, images: list[tuple[int, list[int], Tensor]], merge: int
) -> tuple[Tensor, int]:
    """3-D M-RoPE positions [3, length] of a pruned sequence and its rope delta (max position + 1
    - length), as the stock model gives the FULL sequence at the tokens that remain.

    ``images``: per image, ``(offset, [t, h, w], kept)``: where its kept tokens start in the
    sequence, its patch grid and the ascending indices of the kept tokens in its merged grid.
    Text runs on from the previous position; an image's tokens sit at ``start + (t, row, col)``
    of the merged grid; the text after it continues at the full grid's largest position + 1,
    whichever tokens were kept (the Qwen2-VL rule, ``get_rope_index``; equality with it is tested).
    This is the rule the vLLM engine needs; the HF path takes it from transformers directly."""
    parts, cursor, next_pos = [], 0, 0
    for offset, (t, h, w), kept in sorted(images, key=lambda x: x[0]):
        text = offset - cursor
        parts.append(torch.arange(text).expand(3, text) + next_pos)
        start = next_pos + text
        hm, wm = h // merge, w // merge
        kept = kept.to(torch.long).cpu()
        grid = torch.stack([kept // (hm * wm), (kept % (hm * wm)) // wm, kept % wm])
        parts.append(grid + start)
        next_pos = start + max(t, hm, wm)
        cursor = offset + len(kept)
    tail = length - cursor
    parts.append(torch.arange(tail).expand(3, tail) + next_pos)
    positions = torch.cat(parts, dim=1)
    return positions, int(positions.max()) + 1 - length


def pixel_bounds(image_processor: object, cfg: ModelConfig) -> dict[str, int]:
    """The resize bounds in pixels: the config's where set, else the processor's own."""
    size = image_processor.size
    return {
        "shortest_edge": cfg.min_pixels or size["shortest_edge"],
        "longest_edge": cfg.max_pixels or size["longest_edge"],
    }
