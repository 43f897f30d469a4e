"""The adapter interface the stages and engines use; one implementation per model family.

A family adapter owns every transformers call for its family, so a transformers upgrade
changes one file. The stages see plain tensors and one opaque per-image ``Payload``:

- ``prepare_image(image)`` -> the image as the CPU preparation stage hands it to the GPU: the
  pixel-count-dependent part of the family's image processor (resize, crop, pad, tiles) done,
  as uint8 pixels at the model's input geometry plus what else the family needs (``Prepared``);
  ``input_size(width, height)`` -> the size those pixels are resized to (for draft decoding);
- ``encode_prepared(prepared)`` -> from prepared images: the processor's rescale and normalise
  (``PixelLUT``: exactly its arithmetic, as a lookup on the device), patchify, vision tower,
  projector; ``encode(images)`` is both steps in one process (tests, benchmarks):
  visual tokens in the LLM input-embedding space, per image [N_i, D]
  (exactly the tokens the stock model would hand its LLM, in the same order), plus optional
  per-token seed scores (LLaVA: CLS attention) [N_i], the number of patches the vision encoder
  ran over (for FLOP counts) and the family's payload: whatever else its decoding needs
  (e.g. a patch grid, per-token extra features; see each family's module);
- ``kept_payload(payload, kept)`` -> the payload cut to the kept token indices (what the
  stages carry to the decode stage, serialized with ``payload_bytes``);
- ``embed_words(words)`` -> the LLM input embeddings of each row's words, [M_i, D];
- ``hf_inputs(requests)`` -> the family's model inputs for the HF engine
  (``pipeline.engines.hf``, which pads, calls ``model.generate`` and cuts at EOS);
  ``vllm_request(request)`` -> one row as a request for the family's vLLM model class.

Only the family's adapter and its engine bindings read its payload's keys.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from pipeline.cost.flops import LanguageShape, ModelShapes

if TYPE_CHECKING:  # annotations only: the adapters import without pydantic or PIL (the GPU benchmark's image)
    from PIL import Image

    from pipeline.config import ModelConfig
    from pipeline.tasks import Constraint

# "image": the image processor and config only, for the CPU preparation stage; "vision": encoder +
# projector; "language": the LLM for HF decoding; "prompt": tokenizer, chat template and config
# only (no weights), for engines that load the LLM themselves (vLLM).
Part = Literal["image", "vision", "language", "prompt"]

# Per image, what a family needs besides its kept tokens to decode them, as named tensors only
# its adapter and engine bindings read (the keys are the family's, documented in its module);
# {} for families that need nothing else (LLaVA).
Payload = dict[str, Tensor]

# Per image, what the CPU preparation stage hands the GPU encode stage (``prepare_image``): the
# processor's geometric work done, uint8 "pixels" at the model's input size (4x smaller than the
# float32 the processor would emit) and the family's small extras; crosses Ray as ``payload_bytes``
# (numpy arrays from ``prepare_image``, tensors after ``payload_from_bytes``: adapters take either).
Prepared = dict[str, "np.ndarray | Tensor"]


@dataclass
class EncodedImages:
    features: list[Tensor]  # per image [N_i, D], float32
    seed_scores: list[Tensor] | None  # per image [N_i], or None when the family has no such score
    # Per image, patch tokens the vision encoder ran over, every view/tile included (LLaVA-1.5:
    # 576; LLaVA-NeXT: 576 x views; Qwen2.5-VL: t * h * w before the 2x2 merge).
    encoder_patches: list[int]
    payloads: list[Payload]  # per image, for all N_i tokens (``kept_payload`` cuts it to the kept ones)


class DecodeRequest(NamedTuple):
    """One row for a decode engine: defined here, beside the adapters that read it, so that the
    engines (``pipeline.engines``, which export it) import the adapters and never the reverse."""

    id: str
    prompt: str  # the user's prompt, untemplated (already cut to fit when long_prompt: truncate)
    visual: Tensor  # [K, D] kept visual tokens, float32, in the LLM's input-embedding space
    kept_indices: Tensor  # [K] ascending indices into the image's N visual tokens
    payload: Payload = {}  # the family's payload, cut to the kept tokens (``kept_payload``); never mutated
    max_new_tokens: int | None = None  # this request's bound (its task's); None: generation.max_new_tokens
    constraint: Constraint | None = None  # a choice or JSON Schema the answer must take (pipeline.tasks)


@dataclass
class Generation:
    text: str
    prompt_tokens: int  # sequence length the LLM prefilled: text tokens + kept visual tokens
    generated_tokens: int
    token_ids: list[int]  # generated ids, up to and including EOS


@dataclass
class HFInputs:
    """A batch of prompts as a family's LLM takes them through the stock ``model.generate``, one
    entry per row and unpadded: the HF engine left-pads them into one batch."""

    rows: list[Tensor]  # per row: token ids [L_i] (long) or input embeddings [L_i, D]
    positions: list[Tensor] | None = None  # per row position ids [P, L_i] (Qwen's 3-D M-RoPE); None: contiguous
    extra: dict[str, Any] = field(default_factory=dict)  # further ``generate`` keywords for the whole batch


def to_wire(t: Tensor | np.ndarray) -> np.ndarray:
    """A tensor as a numpy array for a dataset column, in its own dtype: bfloat16, which numpy
    lacks, travels as its 16-bit patterns (uint16), so tokens cross in the model's dtype, not float32."""
    if isinstance(t, np.ndarray):
        return t
    t = t.detach().cpu()
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def from_wire(a: np.ndarray) -> Tensor:
    """The inverse of ``to_wire`` (uint16 is read back as bfloat16: no payload holds real uint16)."""
    t = torch.from_numpy(a if a.flags.writeable else np.array(a))  # from_numpy warns on read-only buffers
    return t.view(torch.bfloat16) if t.dtype == torch.uint16 else t


def payload_bytes(payload: Payload | Prepared) -> bytes:
    """A payload (or a prepared image) as bytes for a dataset column (numpy's npz, uncompressed,
    no pickle; ``to_wire`` dtypes); b"" when empty."""
    if not payload:
        return b""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: to_wire(t) for name, t in payload.items()})
    return buffer.getvalue()


def payload_from_bytes(data: bytes) -> Payload:
    """The inverse of ``payload_bytes``, as tensors."""
    if not len(data):
        return {}
    with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as arrays:
        return {name: from_wire(arrays[name]) for name in arrays.files}


class PixelLUT:
    """An image processor's rescale + normalise as a [C, 256] lookup table of uint8 -> float32,
    built by running the processor's own ``rescale``/``normalize`` on every value of every channel
    (so equal to its output bit for bit: they are elementwise), applied on the model's device.
    The GPU actor then does no per-pixel float work on the host."""

    def __init__(self, image_processor: object, device: torch.device) -> None:
        ip = image_processor
        values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()  # [C, H=1, W=256]
        x = ip.rescale(values, ip.rescale_factor) if ip.do_rescale else values.astype(np.float32)
        if ip.do_normalize:
            x = ip.normalize(x, ip.image_mean, ip.image_std)
        self.table = torch.from_numpy(np.ascontiguousarray(x[:, 0, :], dtype=np.float32)).to(device)
        self.offsets = (torch.arange(3, device=device) * 256).view(3, 1, 1)

    def __call__(self, pixels: Tensor | np.ndarray, dtype: torch.dtype) -> Tensor:
        """uint8 [..., 3, H, W] (host or device) -> the processor's float pixels on the table's
        device, cast to ``dtype``."""
        u8 = torch.as_tensor(pixels).to(self.table.device, non_blocking=True)
        return self.table.flatten()[u8.long() + self.offsets].to(dtype)


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
    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the image processor resizes a ``width`` x ``height`` image to (the
        largest view the model sees): a JPEG may be decoded at a reduced scale down to this
        times ``input.jpeg_draft_margin`` (``pipeline.io.images``). "image" part."""

    @abstractmethod
    def prepare_image(self, image: Image.Image) -> Prepared:
        """An RGB image -> what ``encode_prepared`` takes: the image processor up to and excluding
        rescale/normalise (and patchify), on the CPU. "image" and "vision" parts."""

    @abstractmethod
    def encode_prepared(self, prepared: list[Prepared]) -> EncodedImages:
        """Prepared images (``prepare_image``) -> their visual tokens, exactly as ``encode`` of the
        images would give. "vision" part."""

    def encode(self, images: list[Image.Image]) -> EncodedImages:
        """Prepare and encode in one process (what the stock processor + model do)."""
        return self.encode_prepared([self.prepare_image(image) for image in images])

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

    def kept_payload(self, payload: Payload, kept: Tensor) -> Payload:
        """``payload`` (from ``encode``, for all N tokens) cut to the ``kept`` indices [K],
        ascending: what the decode side receives. Families whose payload is per image only keep
        it whole (the default); per-token parts keep the same indices as the features."""
        return payload

    def vllm_options(self) -> dict[str, Any]:
        """Engine options the checkpoint's config asks of vLLM that vLLM derives only for its own
        class names (ours are registered under their own): none by default."""
        return {}

    def vllm_request(self, request: DecodeRequest) -> dict:
        """One row as a vLLM request for ``vllm_architecture`` (``pipeline.engines.vllm_models``),
        in the adapter's dtype: the templated prompt's ids with one placeholder, which vLLM expands
        to the K kept tokens given as embeddings. Families add what their class reads from the
        payload and the kept indices."""
        image = {"image_embeds": request.visual.to(self.dtype)[None]}
        return {"prompt_token_ids": self.prompt_ids(request.prompt), "multi_modal_data": {"image": image}}

    @abstractmethod
    def embed_words(self, words: list[list[str]]) -> list[Tensor]: ...

    @abstractmethod
    def hf_inputs(self, requests: list[DecodeRequest]) -> HFInputs:
        """The rows' model inputs for the HF engine (language part: ``model``, ``tokenizer`` and
        ``embed`` loaded), each row's prompt with its kept tokens where the stock model would have
        the image, on the model's device; raises ValueError for a request it cannot decode."""


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
