"""The adapter interface the stages use; one implementation per model family.

A family adapter owns every transformers call for its family, so a transformers upgrade
changes one file. The stages see plain tensors:

- ``encode(images)`` -> visual tokens in the LLM input-embedding space, per image [N_i, D]
  (exactly the tokens the stock model would hand its LLM, in the same order), plus optional
  per-token seed scores (LLaVA: CLS attention) [N_i], a per-image ``layout`` and the number of
  patches the vision encoder ran over (for FLOP counts);
- ``embed_words(words)`` -> the LLM input embeddings of each row's words, [M_i, D];
- ``generate(prompts, visual, kept_indices, layouts, gen, deepstack)`` -> answers from the kept
  tokens. ``kept_indices`` (ascending, into the image's N_i tokens) and the ``layout`` that
  ``encode`` gave (carried between the stages unchanged) let families whose positions depend on
  the token grid (Qwen2.5-VL's and Qwen3-VL's 3-D M-RoPE) place each kept token where it was;
  ``deepstack`` carries, per row, the kept tokens' rows of ``EncodedImages.deepstack`` [L, K, D]
  (Qwen3-VL), None for the other families.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from PIL import Image
from torch import Tensor

from pipeline.config import GenerationConfig, ModelConfig
from pipeline.cost.flops import LanguageShape, ModelShapes

# "vision": encoder + projector; "language": the LLM for HF decoding; "prompt": tokenizer, chat
# template and config only (no weights), for engines that load the LLM themselves (vLLM).
Part = Literal["vision", "language", "prompt"]


@dataclass
class EncodedImages:
    features: list[Tensor]  # per image [N_i, D], float32
    seed_scores: list[Tensor] | None  # per image [N_i], or None when the family has no such score
    # Per image, what ``generate`` needs besides the kept tokens to place them (Qwen2.5-VL:
    # image_grid_thw as [t, h, w]); [] for families whose positions do not depend on the image.
    layouts: list[list[int]]
    # Per image, patch tokens the vision encoder ran over, every view/tile included (LLaVA-1.5:
    # 576; LLaVA-NeXT: 576 x views; Qwen2.5-VL: t * h * w before the 2x2 merge).
    encoder_patches: list[int]
    # Per image [L, N_i, D]: features the LLM also receives for each visual token besides
    # ``features``, one row per level (Qwen3-VL's DeepStack, added to its first L layers' hidden
    # states); pruning keeps the same indices in every level. None for families without them.
    deepstack: list[Tensor] | None = None


@dataclass
class Generation:
    text: str
    prompt_tokens: int  # sequence length the LLM prefilled: text tokens + kept visual tokens
    generated_tokens: int
    token_ids: list[int]  # generated ids, up to and including EOS


class VisionLanguageAdapter(ABC):
    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # checkpoint `model_type`s this adapter serves
    default_alpha: ClassVar[float] = 0.75  # ResPrune text-guidance strength the paper uses for the family
    # The vLLM model class (pipeline.engines.vllm_models) that decodes this family from kept tokens.
    vllm_architecture: ClassVar[str]

    def __init__(self, cfg: ModelConfig, path: str, part: Part) -> None:
        """Load what ``part`` needs from ``path``: "vision" for encoding, "language" for decoding
        with HF, "prompt" for the prompt side alone. Subclasses set ``config``, ``tokenizer`` and
        ``image_token_id``."""
        self.cfg = cfg
        self.path = path
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)

    @staticmethod
    @abstractmethod
    def shapes(config: object) -> ModelShapes:
        """The family's transformers config (as loaded by ``AutoConfig``) -> the shapes the cost
        model counts FLOPs and KV bytes from."""

    @staticmethod
    @abstractmethod
    def token_counts(path: str, cfg: ModelConfig, width: int, height: int) -> tuple[int, int]:
        """``(visual tokens the LLM would receive unpruned, encoder patches)`` for a ``width`` x
        ``height`` image: what ``encode`` reports for such an image, worked out from the
        checkpoint's configs alone (``path`` may hold only ``config.json``: then the processor's
        defaults apply), so the cost planner can estimate a corpus without loading weights."""

    @abstractmethod
    def encode(self, images: list[Image.Image]) -> EncodedImages: ...

    @abstractmethod
    def chat_text(self, prompt: str) -> str:
        """The prompt in the family's chat template, with one image placeholder."""

    @property
    def context_length(self) -> int:
        """Positions the LLM was trained for (prompt, visual tokens and generated tokens together)."""
        return int(self.config.get_text_config().max_position_embeddings)

    def text_tokens(self, prompt: str) -> int:
        """Tokens the templated prompt takes besides its image placeholder (language part)."""
        ids = self.tokenizer(self.chat_text(prompt)).input_ids
        return len(ids) - ids.count(self.image_token_id)

    def fit_prompt(self, prompt: str, max_text_tokens: int) -> str | None:
        """``prompt`` cut to its first tokens so that ``text_tokens`` of the result is at most
        ``max_text_tokens``; None when not even an empty prompt fits."""
        room = max_text_tokens - self.text_tokens("")  # what the template itself takes
        if room < 1:
            return None
        ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        # Tokens can merge across the cut and the template's edges: shave a few more if needed.
        for cut in (room, room - 1, room - 2, room - 4, room - 8):
            if cut < 1:
                break
            text = self.tokenizer.decode(ids[:cut], skip_special_tokens=True)
            if self.text_tokens(text) <= max_text_tokens:
                return text
        return None

    def prompt_ids(self, prompt: str) -> list[int]:
        """The templated prompt's token ids, with its single image placeholder."""
        ids = self.tokenizer(self.chat_text(prompt)).input_ids
        if ids.count(self.image_token_id) != 1:
            raise ValueError(
                f"prompt must contain exactly one image placeholder after templating, found {ids.count(self.image_token_id)}"
            )
        return ids

    def vllm_request(
        self, prompt: str, visual: Tensor, kept_indices: Tensor, layout: list[int], deepstack: Tensor | None = None
    ) -> dict:
        """One row as a vLLM request for ``vllm_architecture``: the templated prompt's ids with one
        placeholder, which vLLM expands to the K kept tokens given as embeddings. Families whose
        positions depend on the token grid also send the grid and the kept indices; families with
        DeepStack levels, the kept tokens' rows of them."""
        return {"prompt_token_ids": self.prompt_ids(prompt), "multi_modal_data": {"image": {"image_embeds": visual[None]}}}

    @abstractmethod
    def embed_words(self, words: list[list[str]]) -> list[Tensor]: ...

    @abstractmethod
    def generate(
        self,
        prompts: list[str],
        visual: list[Tensor],
        kept_indices: list[Tensor],
        layouts: list[list[int]],
        gen: GenerationConfig,
        deepstack: list[Tensor] | None = None,
    ) -> list[Generation]: ...


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but this worker has no CUDA device (check the stage's num_gpus)")
    return torch.device(device)


def planned_dtype(cfg: ModelConfig, num_gpus: float) -> torch.dtype:
    """The dtype an actor reserving ``num_gpus`` will run in, decided in the driver: Ray hides
    GPUs from actors that reserve none, so `auto` resolves to cuda exactly when num_gpus > 0."""
    device = cfg.device if cfg.device != "auto" else ("cuda" if num_gpus > 0 else "cpu")
    return resolve_dtype(cfg.dtype, torch.device(device))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def generate_from_embeddings(
    model: object,
    tokenizer: object,
    embed: torch.nn.Module,
    rows: list[Tensor],
    gen: GenerationConfig,
    positions: list[Tensor] | None = None,
) -> list[Generation]:
    """``model.generate`` on per-row prompt embeddings [L_i, D], left-padded into one batch, and
    the answers cut at EOS. ``positions``: per row, the position ids its tokens take ([P, L_i],
    e.g. Qwen2.5-VL's 3-D M-RoPE rows); ``generate`` continues each row from its last position
    + 1. Without them positions are contiguous. Shared by the families whose LLM runs through
    the stock ``generate`` on ``inputs_embeds``."""
    device = rows[0].device
    # Left padding: every row's last position is its own last prompt token.
    width = max(len(r) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = embed(torch.tensor([pad_id], device=device))
    embeds = torch.stack([torch.cat([pad.expand(width - len(r), -1), r]) for r in rows])
    mask = torch.stack(
        [torch.cat([torch.zeros(width - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)]) for r in rows]
    ).to(device)
    extra = {}
    if positions is not None:
        extra["position_ids"] = left_padded_positions(positions, width).to(device)
    new = model.generate(
        inputs_embeds=embeds, attention_mask=mask, pad_token_id=pad_id, **extra, **generate_options(gen)
    )
    return cut_at_eos(model, tokenizer, [len(r) for r in rows], new)


def left_padded_positions(positions: list[Tensor], width: int) -> Tensor:
    """Per-row position ids [P, L_i] left-padded into one [P, B, width] batch; padding positions
    are masked out, so 0 is as good as any."""
    return torch.stack([torch.cat([p.new_zeros((p.shape[0], width - p.shape[1])), p], dim=1) for p in positions], dim=1)


def generate_options(gen: GenerationConfig) -> dict:
    """``model.generate`` keywords for ``gen`` (seeding the global generator when sampling)."""
    options: dict = {"max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample}
    if gen.do_sample:
        torch.manual_seed(gen.seed)
        options |= {"temperature": gen.temperature, "top_p": gen.top_p}
    return options


def cut_at_eos(model: object, tokenizer: object, prompt_lengths: list[int], new: Tensor) -> list[Generation]:
    """Per row, the generated ids [B, T] (new tokens only) up to and including the first EOS, decoded."""
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    out = []
    for length, seq in zip(prompt_lengths, new.tolist(), strict=True):
        n = next((i + 1 for i, t in enumerate(seq) if t in eos_ids), len(seq))
        text = tokenizer.decode(seq[:n], skip_special_tokens=True).strip()
        out.append(Generation(text=text, prompt_tokens=length, generated_tokens=n, token_ids=seq[:n]))
    return out


def decoder_shape(text_config: object) -> LanguageShape:
    """A Llama-style decoder's shapes (Llama, Vicuna, Qwen2: gated MLP, GQA) from its config."""
    tc, heads = text_config, text_config.num_attention_heads
    return LanguageShape(
        layers=tc.num_hidden_layers, hidden=tc.hidden_size, heads=heads,
        kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
        mlp_width=tc.intermediate_size, vocab=tc.vocab_size, mlp_matrices=3,
    )


def word_embeddings(tokenizer: object, embed: torch.nn.Module, words: list[list[str]]) -> list[Tensor]:
    """Each row's words through the tokenizer and the LLM's input embeddings, float32 [M_i, D]."""
    device = embed.weight.device
    out = []
    for row in words:
        ids = [i for w in row for i in tokenizer(w, add_special_tokens=False).input_ids]
        out.append(embed(torch.tensor(ids, dtype=torch.long, device=device)).float())
    return out
