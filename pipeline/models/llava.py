"""LLaVA-1.5 (``LlavaForConditionalGeneration``): every transformers touchpoint of the family.

Encode: CLIP vision tower (eager attention, so CLS attention probabilities are available)
-> hidden layer ``vision_feature_layer`` (-2), CLS dropped -> projector -> [576, D].
Seed scores: attention from CLS to each patch in the layer that produces that hidden state,
mean over heads.
Decode: the chat-templated prompt is tokenized with its single ``<image>`` token; the kept
visual tokens (ascending spatial order) replace that token; ``generate`` runs on
``inputs_embeds``. Positions are contiguous, as in the original LLaVA pruning codebases.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor
from transformers import AutoProcessor, LlavaForConditionalGeneration

from pipeline.config import GenerationConfig, ModelConfig
from pipeline.cost.flops import LanguageShape, ModelShapes, VisionShape

from .base import EncodedImages, Generation, Part, VisionLanguageAdapter


class LlavaAdapter(VisionLanguageAdapter):
    family = "llava"
    model_types = ("llava",)

    def __init__(self, cfg: ModelConfig, path: str, part: Part) -> None:
        super().__init__(cfg, path, part)
        self.processor = AutoProcessor.from_pretrained(path)
        self.tokenizer = self.processor.tokenizer
        model = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=self.dtype, attn_implementation={"vision_config": "eager"}
        ).eval()
        config = model.config
        self.image_token_id: int = config.image_token_id
        self.feature_layer: int | list[int] = config.vision_feature_layer
        self.select_strategy: str = config.vision_feature_select_strategy
        self.embed = model.get_input_embeddings().to(self.device)
        if part == "vision":
            # Keep only what encoding needs; the LLM's weights are freed with `model`.
            self.vision_tower = model.model.vision_tower.to(self.device)
            self.projector = model.model.multi_modal_projector.to(self.device)
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
        heads = tc.num_attention_heads
        return ModelShapes(
            family="llava",
            vision=VisionShape(
                image_size=vc.image_size, patch_size=vc.patch_size, channels=vc.num_channels,
                layers=vc.num_hidden_layers, width=vc.hidden_size, mlp_width=vc.intermediate_size,
                mlp_matrices=2, class_tokens=1,
                projector=(vc.hidden_size * n_feature_layers, tc.hidden_size, tc.hidden_size),
            ),
            language=LanguageShape(
                layers=tc.num_hidden_layers, hidden=tc.hidden_size, heads=heads,
                kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
                head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
                mlp_width=tc.intermediate_size, vocab=tc.vocab_size, mlp_matrices=3,
            ),
        )

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> EncodedImages:
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
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
            cls_attention = torch.cat([cls_attention.new_zeros((len(images), 1)), cls_attention], dim=1)
        return EncodedImages(features=list(features), seed_scores=list(cls_attention))

    @torch.inference_mode()
    def embed_words(self, words: list[list[str]]) -> list[Tensor]:
        out = []
        for row in words:
            ids = [i for w in row for i in self.tokenizer(w, add_special_tokens=False).input_ids]
            t = torch.tensor(ids, dtype=torch.long, device=self.device)
            out.append(self.embed(t).float())
        return out

    def chat_text(self, prompt: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    @torch.inference_mode()
    def generate(
        self, prompts: list[str], visual: list[Tensor], kept_indices: list[Tensor], gen: GenerationConfig
    ) -> list[Generation]:
        rows = []
        for prompt, vis in zip(prompts, visual, strict=True):
            ids = torch.tensor(self.tokenizer(self.chat_text(prompt)).input_ids, device=self.device)
            where = (ids == self.image_token_id).nonzero().flatten()
            if len(where) != 1:
                raise ValueError(f"prompt must contain exactly one image placeholder after templating, found {len(where)}")
            p = int(where[0])
            emb = self.embed(ids)
            rows.append(torch.cat([emb[:p], vis.to(self.device, emb.dtype), emb[p + 1 :]]))
        # Left padding: every row's last position is its own last prompt token.
        width = max(len(r) for r in rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        pad = self.embed(torch.tensor([pad_id], device=self.device))
        embeds = torch.stack([torch.cat([pad.expand(width - len(r), -1), r]) for r in rows])
        mask = torch.stack(
            [torch.cat([torch.zeros(width - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)]) for r in rows]
        ).to(self.device)
        if gen.do_sample:
            torch.manual_seed(gen.seed)
        sampling = {"temperature": gen.temperature, "top_p": gen.top_p} if gen.do_sample else {}
        new = self.model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=gen.max_new_tokens,
            do_sample=gen.do_sample,
            pad_token_id=pad_id,
            **sampling,
        )
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        out = []
        for row, seq in zip(rows, new.tolist(), strict=True):
            n = next((i + 1 for i, t in enumerate(seq) if t in eos_ids), len(seq))
            text = self.tokenizer.decode(seq[:n], skip_special_tokens=True).strip()
            out.append(Generation(text=text, prompt_tokens=len(row), generated_tokens=n, token_ids=seq[:n]))
        return out
