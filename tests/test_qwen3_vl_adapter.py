"""The Qwen3-VL adapter on tiny:qwen3_vl: dynamic-resolution counts (16 px patches), keep-all
generation equal to stock transformers in one left-padded batch, and, pruned, what the LLM
actually receives (observed with forward hooks, no mocks): the stock model's DeepStack rows of
exactly the kept tokens, at exactly the kept tokens' positions, their full-sequence interleaved
M-RoPE positions, and the first decoded token where the unpruned sequence would put it."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import Qwen3VLForConditionalGeneration

from pipeline.config import GenerationConfig, ModelConfig
from pipeline.engines.hf import HFEngine
from pipeline.models import detect_family, load_adapter, token_counts
from pipeline.models.qwen2_5_vl import kept_mrope_positions

from .family_setup import family_fixtures, requests
from .test_qwen2_5_vl_adapter import _check_pruned_row, _observe, _pruned_rows, _stock_generate, grids

SIZES = [(224, 224), (448, 252), (200, 500), (640, 480)]  # square, wide, tall, 4:3 (resized down)
PROMPTS = ["What color is the square?", "Is there a red circle?", "How many shapes?", "Describe it."]
DEEPSTACK = ("visual_pos_masks", "deepstack_visual_embeds")  # what the LLM takes besides embeddings

path, images, adapters, stock = family_fixtures(
    "qwen3_vl", SIZES, lambda path: Qwen3VLForConditionalGeneration.from_pretrained(path).eval()
)


def _stock_deepstack(stock, image_processor, image: Image.Image) -> torch.Tensor:
    """The stock model's DeepStack features of one image, [L, N, D], from its own vision tower."""
    pixels = image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        out = stock.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"])
    return torch.stack([level[0] for level in out.deepstack_features])


def test_token_counts_follow_the_image_and_max_pixels(path, adapters, images) -> None:
    vision, _ = adapters
    assert detect_family(path) == "qwen3_vl"
    enc = vision.encode(images)
    assert enc.seed_scores is None  # no CLS: ResPrune seeds on the largest norm
    assert grids(enc.payloads)[0] == [1, 14, 14] and enc.features[0].shape == (49, 256)  # 224 px = 14 patches of 16 px
    levels = len(vision.config.vision_config.deepstack_visual_indexes)
    deepstack = [p["deepstack"] for p in enc.payloads]
    for img, f, d, (t, h, w), patches in zip(
        images, enc.features, deepstack, grids(enc.payloads), enc.encoder_patches, strict=True
    ):
        assert f.shape[0] == t * h * w // 4 and patches == t * h * w
        assert d.shape == (levels, *f.shape)  # one row per level for every visual token
        assert token_counts(path, vision.cfg, *img.size) == (f.shape[0], patches)
    assert [f.shape[0] for f in enc.features] == [49, 112, 96, 234]
    # A large image is bounded by model.max_pixels (32 x 32 pixels per visual token).
    big = Image.new("RGB", (1600, 1200), (10, 200, 30))
    bounded = load_adapter(ModelConfig(path="tiny:qwen3_vl", device="cpu", max_pixels=64 * 32 * 32), "vision")
    n = bounded.encode([big]).features[0].shape[0]
    assert n <= 64 < vision.encode([big]).features[0].shape[0]
    assert token_counts(path, bounded.cfg, 1600, 1200)[0] == n


def test_keep_all_generation_equals_stock_generate(adapters, stock, images) -> None:
    """Four sizes in ONE batch (left padding, four position layouts) against the stock model fed
    one image at a time: the LLM receives the same embeddings, DeepStack rows and visual mask at
    the same 3-D positions, gives the same logits, and the greedy tokens agree."""
    vision, language = adapters
    enc = vision.encode(images)
    gen = GenerationConfig(max_new_tokens=8)
    kept = [torch.arange(f.shape[0]) for f in enc.features]
    rows = requests(PROMPTS, enc.features, kept, enc.payloads)
    ours, seen = _observe(language.model, lambda: HFEngine(language).generate(rows, gen), DEEPSTACK)
    prefill = seen[0]
    assert prefill["position_ids"].shape[:2] == (3, len(images))
    tok, proc = language.tokenizer, vision.image_processor
    offset = 0  # the batch's DeepStack rows are the rows' visual tokens in (batch, sequence) order
    for i, img in enumerate(images):
        (stock_ids, length), stock_seen = _observe(
            stock, lambda: _stock_generate(stock, tok, proc, img, PROMPTS[i], 8), DEEPSTACK
        )
        ref, n = stock_seen[0], len(kept[i])
        assert ours[i].prompt_tokens == length  # nothing pruned: the full sequence
        assert int(prefill["attention_mask"][i].sum()) == length and bool(prefill["attention_mask"][i, -length:].all())
        # Stock passes [text, t, h, w] position rows; the last three are the M-RoPE ones.
        assert torch.equal(prefill["position_ids"][:, i, -length:], ref["position_ids"][-3:, 0])
        torch.testing.assert_close(prefill["inputs_embeds"][i, -length:], ref["inputs_embeds"][0], atol=1e-5, rtol=1e-4)
        assert torch.equal(prefill["visual_pos_masks"][i, -length:], ref["visual_pos_masks"][0])
        assert len(prefill["deepstack_visual_embeds"]) == len(ref["deepstack_visual_embeds"]) == 2
        for ours_level, ref_level in zip(prefill["deepstack_visual_embeds"], ref["deepstack_visual_embeds"]):
            torch.testing.assert_close(ours_level[offset : offset + n], ref_level, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(prefill["logits"][i], ref["logits"][0], atol=1e-4, rtol=1e-4)
        assert ours[i].token_ids == stock_ids[: len(ours[i].token_ids)], SIZES[i]
        assert len(ours[i].token_ids) == 8 or ours[i].token_ids[-1] == stock.generation_config.eos_token_id
        offset += n
    assert len({tuple(g.token_ids) for g in ours}) > 1  # answers depend on the image


def test_pruned_tokens_get_their_deepstack_rows_and_positions_and_decoding_continues_where_unpruned_would(
    adapters, stock, images
) -> None:
    vision, language = adapters
    prompts, visual, kept, payloads = _pruned_rows(vision, language, images)
    full_payloads = vision.encode(images[1:3]).payloads
    for p, full, k in zip(payloads, full_payloads, kept, strict=True):  # the same indices in every level
        assert torch.equal(p["deepstack"], full["deepstack"][:, k]) and torch.equal(p["grid_thw"], full["grid_thw"])
    rows = requests(prompts, visual, kept, payloads)
    gen = GenerationConfig(max_new_tokens=2)
    out, seen = _observe(language.model, lambda: HFEngine(language).generate(rows, gen), DEEPSTACK)
    assert seen[0]["position_ids"].shape[0] == 3 and seen[1]["position_ids"].shape == (3, 2, 1)  # [3, B, L], [3, B, 1]
    assert seen[1]["deepstack_visual_embeds"] is None  # DeepStack rows enter with the prompt only
    offset = 0
    for b, (img, layout, k) in enumerate(zip(images[1:3], grids(payloads), kept, strict=True)):
        got, start, length, n, expected = _check_pruned_row(stock, language, vision, img, prompts[b], k, b, out, seen)
        # The vLLM engine's rule gives the same positions (kept_mrope_positions).
        rule, rule_delta = kept_mrope_positions(length, [(start, layout, k)], language.merge)
        assert torch.equal(rule, got) and rule_delta == expected - length
        # DeepStack: the mask marks exactly the kept tokens' positions, and what is added there is
        # the STOCK model's DeepStack features of this image at the kept indices, level by level.
        mask = seen[0]["visual_pos_masks"][b, -length:]
        assert mask.nonzero().flatten().tolist() == list(range(start, start + len(k)))
        stock_levels = _stock_deepstack(stock, vision.image_processor, img)
        for level, rows in enumerate(seen[0]["deepstack_visual_embeds"]):
            torch.testing.assert_close(rows[offset : offset + len(k)], stock_levels[level][k], atol=1e-5, rtol=1e-4)
        offset += len(k)
        # Compacted positions would fail all of the above (Qwen3-VL: text after an image resumes
        # at start + max(h, w) / 2).
        after = start + max(layout[1], layout[2]) // 2
        assert len(k) < n and int(got[0, start + len(k)]) == after != start + len(k)
    assert offset == sum(len(k) for k in kept)  # no DeepStack row beyond the kept tokens'


def test_deepstack_rows_are_required_and_change_the_answer(adapters, images) -> None:
    """Dropping the DeepStack rows gives fluent but different answers, so they cannot be optional."""
    vision, language = adapters
    enc = vision.encode(images)
    kept = [torch.arange(f.shape[0]) for f in enc.features]
    gen = GenerationConfig(max_new_tokens=6)
    engine = HFEngine(language)
    with_levels = engine.generate(requests(PROMPTS, enc.features, kept, enc.payloads), gen)
    zeroed = [{**p, "deepstack": torch.zeros_like(p["deepstack"])} for p in enc.payloads]
    without = [{"grid_thw": p["grid_thw"]} for p in enc.payloads]
    assert [g.token_ids for g in with_levels] != [g.token_ids for g in engine.generate(
        requests(PROMPTS, enc.features, kept, zeroed), gen)]
    with pytest.raises(ValueError, match="DeepStack"):
        engine.generate(requests(PROMPTS, enc.features, kept, without), gen)
    with pytest.raises(ValueError, match="DeepStack"):  # levels of other tokens than the kept ones
        engine.generate(requests(PROMPTS[:1], [enc.features[0][:10]], [torch.arange(10)], enc.payloads[:1]), gen)


def test_prefill_flops_of_a_pruned_row_match_the_flop_counter(path, adapters, images) -> None:
    """The cost columns' prefill count (``decoder_shape`` of Qwen3-VL's text config, QK-norm and
    the DeepStack additions being no matrix products) against PyTorch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.cost.flops import prefill_flops
    from pipeline.models import model_shapes

    vision, _ = adapters
    language = load_adapter(ModelConfig(path="tiny:qwen3_vl", device="cpu"), "language")
    language.model.set_attn_implementation("eager")  # the counter does not see CPU SDPA kernels
    enc = vision.encode(images[1:2])
    kept = torch.arange(0, enc.features[0].shape[0], 3)
    with FlopCounterMode(display=False) as counter:
        rows = requests(PROMPTS[:1], [enc.features[0][kept]], [kept], [language.kept_payload(enc.payloads[0], kept)])
        out = HFEngine(language).generate(rows, GenerationConfig(max_new_tokens=1))
    analytic = prefill_flops(model_shapes(path).language, out[0].prompt_tokens)
    counted = counter.get_total_flops()
    assert abs(analytic - counted) / counted <= 0.05, (analytic, counted)
