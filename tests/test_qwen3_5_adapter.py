"""The Qwen3.5 adapter on tiny:qwen3_5 (a hybrid Gated DeltaNet + gated attention decoder):
dynamic-resolution counts (16 px patches, no DeepStack), keep-all generation equal to stock
transformers in one left-padded batch, pruned rows at their full-sequence 3-D positions
(observed with forward hooks, no mocks), and the hybrid decoder's FLOPs against PyTorch's counter."""

from __future__ import annotations

import torch
from transformers import Qwen3_5ForConditionalGeneration

from pipeline.config import GenerationConfig
from pipeline.engines.hf import HFEngine
from pipeline.cost.flops import decode_flops, prefill_flops
from pipeline.models import detect_family, model_shapes, token_counts
from pipeline.models.qwen2_5_vl import kept_mrope_positions

from .family_setup import family_fixtures, requests
from .test_qwen2_5_vl_adapter import _check_pruned_row, _observe, _pruned_rows, check_keep_all_equals_stock, grids

SIZES = [(224, 224), (448, 252), (200, 500), (640, 480)]  # square, wide, tall, 4:3 (resized down)
PROMPTS = ["What color is the square?", "Is there a red circle?", "How many shapes?", "Describe it."]

def _stock(path: str) -> Qwen3_5ForConditionalGeneration:
    model = Qwen3_5ForConditionalGeneration.from_pretrained(path).eval()
    # Random weights may answer EOS first; the position checks need a decode step after it
    # (the comparisons of generated ids are prefix comparisons, so running on changes nothing).
    model.generation_config.eos_token_id = None
    return model


path, images, adapters, stock = family_fixtures("qwen3_5", SIZES, _stock)


def test_token_counts_follow_the_image(path, adapters, images) -> None:
    vision, _ = adapters
    assert detect_family(path) == "qwen3_5"
    enc = vision.encode(images)
    assert enc.seed_scores is None and all(set(p) == {"grid_thw"} for p in enc.payloads)  # no DeepStack
    for img, f, (t, h, w), patches in zip(images, enc.features, grids(enc.payloads), enc.encoder_patches, strict=True):
        assert f.shape[0] == t * h * w // 4 and patches == t * h * w
        assert token_counts(path, vision.cfg, *img.size) == (f.shape[0], patches)
    assert [f.shape[0] for f in enc.features] == [49, 112, 96, 234]


def test_keep_all_generation_equals_stock_generate(adapters, stock, images) -> None:
    """Four sizes in ONE batch (left padding through the DeltaNet layers, four position layouts)
    against the stock model fed one image at a time: the same embeddings, 3-D positions, logits
    and greedy tokens."""
    check_keep_all_equals_stock(adapters, stock, images, PROMPTS)


def test_pruned_tokens_keep_their_3d_positions_and_decoding_continues_where_unpruned_would(
    adapters, stock, images
) -> None:
    vision, language = adapters
    prompts, visual, kept, payloads = _pruned_rows(vision, language, images)
    rows = requests(prompts, visual, kept, payloads)
    out, seen = _observe(language.model, lambda: HFEngine(language).generate(rows, GenerationConfig(max_new_tokens=2)))
    for b, (img, layout, k) in enumerate(zip(images[1:3], grids(payloads), kept, strict=True)):
        got, start, length, n, expected = _check_pruned_row(stock, language, vision, img, prompts[b], k, b, out, seen)
        torch.testing.assert_close(seen[0]["inputs_embeds"][b, -length:][start : start + len(k)], visual[b])
        rule, rule_delta = kept_mrope_positions(length, [(start, layout, k)], language.merge)  # the vLLM rule
        assert torch.equal(rule, got) and rule_delta == expected - length
        after = start + max(layout[1], layout[2]) // 2  # compacted positions would put the text at start + K
        assert len(k) < n and int(got[0, start + len(k)]) == after != start + len(k)


def test_hybrid_decoder_flops_match_the_flop_counter(path, adapters, images) -> None:
    """Prefill (attention layers with the gated q_proj, Gated DeltaNet projections, convolution
    and chunked delta rule) equals the counter; decode adds the recurrent update, which
    transformers runs as elementwise ops the counter does not see (a fraction of a percent)."""
    from torch.utils.flop_counter import FlopCounterMode

    vision, language = adapters
    language.model.set_attn_implementation("eager")  # the counter does not see CPU SDPA kernels
    # The counter's module tracker cannot hook parameters that require grad under inference mode.
    language.model.requires_grad_(False)
    lang = model_shapes(path).language
    enc = vision.encode(images[1:2])
    for kept in (torch.arange(enc.features[0].shape[0]), torch.arange(0, enc.features[0].shape[0], 3)):
        for new in (1, 9):
            rows = requests(PROMPTS[:1], [enc.features[0][kept]], [kept], enc.payloads[:1])
            with FlopCounterMode(display=False) as counter:
                g = HFEngine(language).generate(rows, GenerationConfig(max_new_tokens=new))[0]
            analytic = prefill_flops(lang, g.prompt_tokens) + decode_flops(lang, g.prompt_tokens, g.generated_tokens)
            counted = counter.get_total_flops()
            if g.generated_tokens == 1:
                assert analytic == counted
            assert abs(analytic - counted) / counted <= 0.05, (analytic, counted)
    # A dense decoder's count of the same shapes (attention and KV in every layer) would be far off.
    assert lang.attention_layers == 1 and lang.linear.layers == 3


def test_reported_state_is_what_the_models_cache_holds_per_sequence(path, adapters) -> None:
    """The per-sequence state the cost model reports (``state_bytes``) is the linear-attention
    layers' state in transformers' own cache after a prompt: the float32 delta-rule state and the
    convolution's window. transformers keeps all K taps of the window; a step needs the last K-1
    (what vLLM allocates, and what is counted). The attention layers' KV grows; the state does not."""
    from pipeline.cost.flops import kv_cache_bytes, state_bytes

    _, language = adapters
    lang = model_shapes(path).language
    held = []
    for length in (7, 40):
        ids = torch.randint(0, language.model.get_input_embeddings().num_embeddings, (1, length))
        with torch.no_grad():
            cache = language.model(input_ids=ids, use_cache=True).past_key_values
        linear = [layer for layer in cache.layers if hasattr(layer, "recurrent_states")]
        assert len(linear) == lang.linear.layers
        k = lang.linear.conv_kernel
        state = sum(layer.recurrent_states[0].nbytes + layer.conv_states[0].nbytes * (k - 1) // k for layer in linear)
        assert all(layer.recurrent_states[0].dtype == torch.float32 for layer in linear)
        assert state == state_bytes(lang, bytes_per_element=4)  # tiny on CPU: float32 throughout
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if not hasattr(layer, "recurrent_states"))
        assert kv == kv_cache_bytes(lang, length, 1, bytes_per_element=4)
        held.append((state, kv))
    assert held[0][0] == held[1][0] and held[1][1] > held[0][1]
