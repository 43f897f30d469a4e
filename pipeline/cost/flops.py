"""Analytic FLOP and KV-cache counts from a model's shapes: plain arithmetic, no transformers.

Convention (the one ``torch.utils.flop_counter.FlopCounterMode`` uses, tested against it):
2 FLOPs per multiply-add; matrix products only (norms, activations, softmax, biases are not
counted); attention counts the full L x L score matrix (QK^T and AV, 2 * L * L * head_dim
each per query head), as the counter does for eager and SDPA attention alike, although a
causal kernel skips about half of it. GQA: K/V projections use the KV heads, attention
products use the query heads. The LM head runs once per generated token (``generate`` keeps
only the last position's logits), so prefill includes one LM-head row.

Family adapters map their transformers configs onto ``VisionShape`` / ``LanguageShape``
(``VisionLanguageAdapter.shapes``); nothing here knows a model family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class VisionShape:
    """The vision encoder plus the projector into the LLM's embedding space.

    Fixed-size views (``image_size`` > 0; LLaVA-1.5, LLaVA-NeXT): each view (the image, or the
    base view and every tile) is its own sequence of ``patches`` patches plus ``class_tokens``.
    Dynamic resolution (``image_size`` = 0; Qwen2.5-VL, Qwen3-VL): the whole image is one sequence of any
    length; with ``attention_window`` > 0 every layer but ``full_attention_layers`` of them
    attends only inside windows of that many patches.
    """

    image_size: int  # pixels per side of a fixed-size view; 0: dynamic resolution
    patch_size: int
    channels: int
    layers: int  # encoder layers that actually run
    width: int
    mlp_width: int
    mlp_matrices: int = 2  # 2: fc1/fc2; 3: gated (gate/up/down)
    class_tokens: int = 1  # tokens besides the patches (CLS), per view
    projector: tuple[int, ...] = ()  # widths of the projector's linear chain: in, hidden..., out
    projectors: int = 1  # projector chains over the merged tokens (Qwen3-VL: the main one + one per DeepStack level)
    temporal_patch: int = 1  # frames per patch (Qwen2.5-VL: 2, a still image repeated)
    spatial_merge: int = 1  # patches merged into one LLM token along each side (Qwen2.5-VL: 2)
    attention_window: int = 0  # patches per attention window; 0: full attention in every layer
    full_attention_layers: int = 0  # with windows: layers that attend over the whole sequence

    @property
    def patches(self) -> int:
        """Patches of one fixed-size view (0 for dynamic resolution)."""
        return (self.image_size // self.patch_size) ** 2 if self.image_size else 0


@dataclass(frozen=True)
class LinearAttentionShape:
    """Gated DeltaNet layers (Qwen3.5's linear attention): per token, projections to q, k, v
    (``key_heads`` x ``key_dim`` for q and k, ``value_heads`` x ``value_dim`` for v), an output
    gate z and two per-head scalars (beta, the decay), a depthwise causal convolution of
    ``conv_kernel`` taps over q|k|v, the gated delta rule on a [key_dim, value_dim] state per
    value head, and the output projection. No KV cache: a fixed state per sequence and layer."""

    layers: int
    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int
    conv_kernel: int
    chunk: int = 64  # prefill runs the delta rule in chunks of this many positions (padded up)

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim

    def projection_flops_per_token(self, hidden: int) -> int:
        """In-projections (q|k|v, z, beta, decay) and the out-projection, one token, one layer."""
        value = self.value_heads * self.value_dim
        return 2 * hidden * (self.conv_channels + value + 2 * self.value_heads) + 2 * value * hidden

    def state_elements(self) -> int:
        """One sequence's state in one layer: the delta rule's [key_dim, value_dim] per value
        head and the convolution's last ``conv_kernel - 1`` inputs."""
        return self.value_heads * self.key_dim * self.value_dim + self.conv_channels * (self.conv_kernel - 1)


@dataclass(frozen=True)
class LanguageShape:
    layers: int  # all decoder layers; with ``linear``, ``linear.layers`` of them are linear attention
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_width: int
    vocab: int
    mlp_matrices: int = 3  # Llama/Qwen gated MLP: gate, up, down
    attention_output_gate: bool = False  # Qwen3.5: q_proj also gives a sigmoid gate per output channel
    linear: LinearAttentionShape | None = None  # hybrid decoders (Qwen3.5): the linear-attention layers

    @property
    def attention_layers(self) -> int:
        """Layers with softmax attention (and a KV cache)."""
        return self.layers - (self.linear.layers if self.linear else 0)

    @property
    def linear_flops_per_token(self) -> int:
        """Q, K, V, O projections and the MLP, one token through one attention layer."""
        q_out = self.heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        q_proj = q_out * (2 if self.attention_output_gate else 1)
        return 2 * (self.hidden * q_proj + 2 * self.hidden * kv_out + q_out * self.hidden
                    + self.mlp_matrices * self.hidden * self.mlp_width)

    @property
    def token_flops(self) -> int:
        """Every layer's projections and MLP for one token (the weights' matrix products: twice
        the decoder's matrix parameters)."""
        dense = self.attention_layers * self.linear_flops_per_token
        if not self.linear:
            return dense
        mlp = 2 * self.mlp_matrices * self.hidden * self.mlp_width
        return dense + self.linear.layers * (self.linear.projection_flops_per_token(self.hidden) + mlp)

    @property
    def lm_head_flops(self) -> int:
        return 2 * self.hidden * self.vocab


@dataclass(frozen=True)
class ModelShapes:
    family: str
    vision: VisionShape
    language: LanguageShape


def vision_flops(v: VisionShape, encoder_patches: int) -> int:
    """Patch embedding and encoder layers over ``encoder_patches`` patches (every view), then the
    projector over the tokens they merge into."""
    patch_embed = 2 * v.channels * v.temporal_patch * v.patch_size**2 * v.width * encoder_patches
    linear = 2 * (4 * v.width * v.width + v.mlp_matrices * v.width * v.mlp_width)  # per token, per layer
    if v.image_size:  # fixed-size views, full attention inside each
        views = math.ceil(encoder_patches / v.patches)
        seq = v.patches + v.class_tokens
        layers = views * v.layers * (seq * linear + 4 * seq * seq * v.width)
    else:
        seq = encoder_patches
        full = v.layers if not v.attention_window else v.full_attention_layers
        window = min(v.attention_window, seq)  # a full window's cost: exact when the grid tiles into windows
        attention = full * 4 * seq * seq * v.width + (v.layers - full) * 4 * seq * window * v.width
        layers = v.layers * seq * linear + attention
    tokens = encoder_patches // v.spatial_merge**2
    projector = v.projectors * sum(2 * tokens * a * b for a, b in zip(v.projector, v.projector[1:]))
    return patch_embed + layers + projector


def _linear_prefill(la: LinearAttentionShape, seq_len: int) -> int:
    """A linear-attention layer's sequence work in prefill: the convolution over the
    ``seq_len + conv_kernel - 1`` outputs of its zero-padded input (as the counter sees it), and
    the chunked delta rule over the sequence padded to whole chunks (per chunk and value head:
    the in-chunk key products and the state reads and writes)."""
    conv = 2 * la.conv_kernel * la.conv_channels * (seq_len + la.conv_kernel - 1)
    padded = -(-seq_len // la.chunk) * la.chunk
    per_position = 4 * la.chunk * la.key_dim + 2 * la.chunk * la.value_dim + 6 * la.key_dim * la.value_dim
    return conv + la.value_heads * padded * per_position


def _linear_step(la: LinearAttentionShape) -> int:
    """A linear-attention layer's sequence work for one decode token: the convolution at its
    position and the recurrent update (decay, read, outer-product write, read out: ~3
    state-sized products per value head, which transformers runs as elementwise ops the
    counter does not see)."""
    return 2 * la.conv_kernel * la.conv_channels + la.value_heads * 6 * la.key_dim * la.value_dim


def prefill_flops(lang: LanguageShape, seq_len: int) -> int:
    """All layers over ``seq_len`` prompt tokens, plus the LM head for the first generated token."""
    attention = lang.attention_layers * 4 * seq_len * seq_len * lang.heads * lang.head_dim
    linear = lang.linear.layers * _linear_prefill(lang.linear, seq_len) if lang.linear else 0
    return seq_len * lang.token_flops + attention + linear + lang.lm_head_flops


def decode_flops(lang: LanguageShape, seq_len: int, generated: int) -> int:
    """The ``generated - 1`` single-token steps after prefill (the first token comes out of
    prefill); step s attends over ``seq_len + s`` cached positions (linear-attention layers do
    the same work at every step, whatever the length)."""
    steps = max(0, generated - 1)
    attended = steps * seq_len + steps * (steps + 1) // 2  # sum of context lengths over the steps
    linear = lang.linear.layers * _linear_step(lang.linear) if lang.linear else 0
    return (steps * (lang.token_flops + lang.lm_head_flops + linear)
            + lang.attention_layers * 4 * lang.heads * lang.head_dim * attended)


def kv_cache_bytes(lang: LanguageShape, seq_len: int, generated: int, bytes_per_element: int) -> int:
    """K and V of every position fed through the model by the end of generation, in the
    attention layers: the prompt and all generated tokens but the last (it is sampled, never
    fed back). A linear-attention layer's state does not grow: ``state_bytes``."""
    positions = seq_len + max(0, generated - 1)
    return 2 * lang.attention_layers * lang.kv_heads * lang.head_dim * positions * bytes_per_element


def state_bytes(lang: LanguageShape, bytes_per_element: int, state_bytes_per_element: int = 4) -> int:
    """The fixed per-sequence state of the linear-attention layers (0 for a dense decoder): the
    delta-rule state in ``state_bytes_per_element`` (float32 in vLLM and transformers) and the
    convolution's window in the model's dtype."""
    la = lang.linear
    if not la:
        return 0
    delta = la.value_heads * la.key_dim * la.value_dim
    return la.layers * (delta * state_bytes_per_element + (la.state_elements() - delta) * bytes_per_element)


@dataclass(frozen=True)
class RowFlops:
    vision: int
    prefill: int
    prefill_unpruned: int
    decode: int
    decode_unpruned: int
    kv_cache_bytes: int
    kv_cache_bytes_unpruned: int

    @property
    def total(self) -> int:
        return self.vision + self.prefill + self.decode

    @property
    def total_unpruned(self) -> int:
        return self.vision + self.prefill_unpruned + self.decode_unpruned


def row_flops(
    shapes: ModelShapes, *, visual_tokens_in: int, visual_tokens_kept: int, encoder_patches: int, prompt_tokens: int,
    generated_tokens: int, bytes_per_element: int,
) -> RowFlops:
    """One row's counts; ``_unpruned`` is the same row with every visual token kept and the same
    number of generated tokens."""
    unpruned_len = prompt_tokens - visual_tokens_kept + visual_tokens_in
    lang = shapes.language
    return RowFlops(
        vision=vision_flops(shapes.vision, encoder_patches),
        prefill=prefill_flops(lang, prompt_tokens),
        prefill_unpruned=prefill_flops(lang, unpruned_len),
        decode=decode_flops(lang, prompt_tokens, generated_tokens),
        decode_unpruned=decode_flops(lang, unpruned_len, generated_tokens),
        kv_cache_bytes=kv_cache_bytes(lang, prompt_tokens, generated_tokens, bytes_per_element),
        kv_cache_bytes_unpruned=kv_cache_bytes(lang, unpruned_len, generated_tokens, bytes_per_element),
    )
