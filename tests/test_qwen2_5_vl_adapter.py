"""The Qwen2.5-VL adapter on tiny:qwen2_5_vl: dynamic-resolution counts, keep-all generation
equal to stock transformers (what the LLM receives, its logits, the tokens), and the 3-D M-RoPE
positions the LLM actually receives when pruned (observed with forward hooks, no mocks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from pipeline.config import GenerationConfig, ModelConfig
from pipeline.engines.hf import HFEngine
from pipeline.models import detect_family, load_adapter, token_counts
from pipeline.pruning import budget, get_method, relevance

from .family_setup import family_fixtures, requests

SIZES = [(224, 224), (448, 252), (200, 500), (640, 480)]  # square, wide, tall, 4:3 (resized down)
PROMPTS = ["What color is the square?", "Is there a red circle?", "How many shapes?", "Describe it."]
IMAGE_PAD = "<|image_pad|>"

path, images, adapters, stock = family_fixtures(
    "qwen2_5_vl", SIZES, lambda path: Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
)


def grids(payloads: list[dict]) -> list[list[int]]:
    """Each image's [t, h, w] patch grid, from its payload."""
    return [p["grid_thw"].tolist() for p in payloads]


def _stock_inputs(tokenizer, image_processor, image: Image.Image, prompt: str) -> dict[str, torch.Tensor]:
    """The stock model's inputs, built as ``Qwen2_5_VLProcessor`` builds them (it cannot be
    constructed here: its video processor needs torchvision): the chat template's single image
    placeholder expanded to prod(image_grid_thw) / 4 placeholders in the TEXT, then tokenized;
    mm_token_type_ids 1 on the placeholders. Nothing here goes through the adapter."""
    pixels = image_processor(images=[image], return_tensors="pt")
    n = int(pixels["image_grid_thw"][0].prod()) // image_processor.merge_size**2
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert text.count(IMAGE_PAD) == 1
    ids = tokenizer(text.replace(IMAGE_PAD, IMAGE_PAD * n), return_tensors="pt").input_ids
    return {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels["pixel_values"],
        "image_grid_thw": pixels["image_grid_thw"],
        "mm_token_type_ids": (ids == tokenizer.convert_tokens_to_ids(IMAGE_PAD)).int(),
    }


def _stock_generate(model, tokenizer, image_processor, image, prompt: str, n: int) -> tuple[list[int], int]:
    """Greedy ids the stock model generates from the full prompt, and that prompt's length."""
    inputs = _stock_inputs(tokenizer, image_processor, image, prompt)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist(), inputs["input_ids"].shape[1]


def _observe(
    model: Qwen2_5_VLForConditionalGeneration, fn: Callable[[], Any], extra: tuple[str, ...] = ()
) -> tuple[Any, list[dict]]:
    """Run ``fn``; per forward of ``model``'s language model, what it received (position_ids,
    inputs_embeds, attention_mask: None where generate dropped an all-ones mask, and the ``extra``
    keywords) and the logits ``lm_head`` gave for the last position."""
    seen: list[dict] = []

    def inputs(_m, _a, kw):
        seen.append({k: kw.get(k) for k in ("position_ids", "inputs_embeds", "attention_mask", *extra)})

    def logits(_m, _a, out):
        seen[-1]["logits"] = out[:, -1].clone()

    handles = [model.model.language_model.register_forward_pre_hook(inputs, with_kwargs=True),
               model.lm_head.register_forward_hook(logits)]
    try:
        return fn(), seen
    finally:
        for h in handles:
            h.remove()


def test_token_counts_follow_the_image_and_max_pixels(path, adapters, images) -> None:
    vision, _ = adapters
    assert detect_family(path) == "qwen2_5_vl"
    enc = vision.encode(images)
    assert enc.seed_scores is None  # no CLS: ResPrune seeds on the largest norm
    assert grids(enc.payloads)[0] == [1, 16, 16] and enc.features[0].shape == (64, 256)  # 224 px = 16 patches of 14 px
    assert all(set(p) == {"grid_thw"} for p in enc.payloads)  # the grid alone places the tokens
    for img, f, (t, h, w), patches in zip(images, enc.features, grids(enc.payloads), enc.encoder_patches, strict=True):
        assert f.shape[0] == t * h * w // 4 and patches == t * h * w
        assert token_counts(path, vision.cfg, *img.size) == (f.shape[0], patches)
    assert [f.shape[0] for f in enc.features] == [64, 144, 126, 234]
    # A large image is bounded by model.max_pixels (28 x 28 pixels per visual token).
    big = Image.new("RGB", (1600, 1200), (10, 200, 30))
    bounded = load_adapter(ModelConfig(path="tiny:qwen2_5_vl", device="cpu", max_pixels=64 * 28 * 28), "vision")
    n = bounded.encode([big]).features[0].shape[0]
    assert n <= 64 < vision.encode([big]).features[0].shape[0]
    assert token_counts(path, bounded.cfg, 1600, 1200)[0] == n


def test_keep_all_generation_equals_stock_generate(adapters, stock, images) -> None:
    """Four sizes in ONE batch (left padding, four position layouts) against the stock model fed
    one image at a time: the LLM receives the same embeddings at the same 3-D positions, gives the
    same logits, and the greedy tokens agree."""
    check_keep_all_equals_stock(adapters, stock, images)


def check_keep_all_equals_stock(adapters, stock, images, prompts: list[str] = PROMPTS, new: int = 8) -> None:
    """Every image's tokens kept, all rows in one HF engine batch, against the stock model's own
    processor and ``generate`` one image at a time (Qwen families whose LLM takes inputs_embeds
    and 3-D positions: Qwen2.5-VL, Qwen3.5)."""
    vision, language = adapters
    enc = vision.encode(images)
    kept = [torch.arange(f.shape[0]) for f in enc.features]
    rows = requests(prompts, enc.features, kept, enc.payloads)
    ours, seen = _observe(language.model, lambda: HFEngine(language).generate(rows, GenerationConfig(max_new_tokens=new)))
    prefill = seen[0]
    assert prefill["position_ids"].shape[:2] == (3, len(images))
    tok, proc = language.tokenizer, vision.image_processor
    for i, img in enumerate(images):
        (stock_ids, length), stock_seen = _observe(stock, lambda: _stock_generate(stock, tok, proc, img, prompts[i], new))
        ref = stock_seen[0]
        assert ours[i].prompt_tokens == length  # nothing pruned: the full sequence
        assert int(prefill["attention_mask"][i].sum()) == length and bool(prefill["attention_mask"][i, -length:].all())
        # Stock passes [text, t, h, w] position rows; the last three are the M-RoPE ones.
        assert torch.equal(prefill["position_ids"][:, i, -length:], ref["position_ids"][-3:, 0])
        torch.testing.assert_close(prefill["inputs_embeds"][i, -length:], ref["inputs_embeds"][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(prefill["logits"][i], ref["logits"][0], atol=1e-4, rtol=1e-4)
        assert ours[i].token_ids == stock_ids[: len(ours[i].token_ids)], img.size
        assert len(ours[i].token_ids) == new or ours[i].token_ids[-1] == stock.generation_config.eos_token_id
    assert len({tuple(g.token_ids) for g in ours}) > 1  # answers depend on the image


def _pruned_rows(vision, language, images: list[Image.Image]) -> tuple[list[str], list, list, list]:
    """Two images of different sizes (448 x 252 wide, 200 x 500 tall: different N and K in one
    batch) pruned by ResPrune to a third: ``(prompts, visual, kept, payloads)``, as the encode
    stage hands them on."""
    enc = vision.encode(images[1:3])
    words = vision.embed_words([["circle"], ["shapes"]])
    kept = []
    for f, w in zip(enc.features, words, strict=True):
        idx = get_method("resprune")(f, budget(f.shape[0], prune_ratio=0.667), relevance=relevance(f, w), alpha=0.3)
        kept.append(idx.sort().values)
    assert kept[0].shape[0] != kept[1].shape[0]
    visual = [f[k] for f, k in zip(enc.features, kept, strict=True)]
    payloads = [language.kept_payload(p, k) for p, k in zip(enc.payloads, kept, strict=True)]
    return PROMPTS[1:3], visual, kept, payloads


def _check_pruned_row(stock, language, vision, image, prompt: str, k, b: int, out: list, seen: list[dict]) -> tuple:
    """Row ``b`` of a pruned batch against the stock model's FULL sequence: its length, the text
    and the kept tokens at their full-sequence (t, row, col) positions, and the first decoded
    token where the unpruned model puts it. Returns ``(positions [3, L], start, length, n, the
    first decoded token's position)``."""
    tok, proc = language.tokenizer, vision.image_processor
    # The full (unpruned) sequence's positions, from the stock model's own rope index.
    full = _stock_inputs(tok, proc, image, prompt)
    want, delta = stock.model.get_rope_index(
        full["input_ids"], mm_token_type_ids=full["mm_token_type_ids"], image_grid_thw=full["image_grid_thw"]
    )
    want, ids = want[:, 0], full["input_ids"][0]
    n = int(full["mm_token_type_ids"].sum())
    start = int(full["mm_token_type_ids"][0].argmax())
    length = len(ids) - n + len(k)
    assert out[b].prompt_tokens == length
    assert int(seen[0]["attention_mask"][b].sum()) == length
    got = seen[0]["position_ids"][:, b, -length:]  # left padding: the row's tokens are its last `length` columns
    # Text before the image, the kept visual tokens at their full-sequence (t, row, col), text after.
    assert torch.equal(got[:, :start], want[:, :start])
    assert torch.equal(got[:, start : start + len(k)], want[:, start + k])
    assert torch.equal(got[:, start + len(k) :], want[:, start + n :])
    # The first decoded token (the first generated token fed back) sits where the unpruned
    # model puts it: what stock generate feeds for its own first decoded token, max + 1.
    _, stock_seen = _observe(stock, lambda: _stock_generate(stock, tok, proc, image, prompt, 2))
    expected = int(want.max()) + 1
    first_decode = seen[1]["position_ids"]  # [3, B, 1]
    assert first_decode[:, b, 0].tolist() == stock_seen[1]["position_ids"][-3:, 0, 0].tolist() == [expected] * 3
    # i.e. the rope delta is max + 1 - pruned length: the full sequence's delta plus the pruned count.
    assert expected - length == int(delta) + n - len(k)
    assert expected != length
    return got, start, length, n, expected


def test_pruned_tokens_keep_their_3d_positions_and_decoding_continues_where_unpruned_would(
    adapters, stock, images
) -> None:
    vision, language = adapters
    prompts, visual, kept, payloads = _pruned_rows(vision, language, images)
    rows = requests(prompts, visual, kept, payloads)
    out, seen = _observe(language.model, lambda: HFEngine(language).generate(rows, GenerationConfig(max_new_tokens=2)))
    assert seen[0]["position_ids"].shape[0] == 3 and seen[1]["position_ids"].shape == (3, 2, 1)  # [3, B, L], [3, B, 1]
    for b, (img, layout, k) in enumerate(zip(images[1:3], grids(payloads), kept, strict=True)):
        got, start, length, n, _ = _check_pruned_row(stock, language, vision, img, prompts[b], k, b, out, seen)
        # The kept visual embeddings sit exactly where their positions say.
        torch.testing.assert_close(seen[0]["inputs_embeds"][b, -length:][start : start + len(k)], visual[b])
        # Compacted positions would fail all of the above: the text after the image starts where the
        # unpruned image ends (start + max(h, w) / 2 in M-RoPE), not at start + K, and the kept
        # visual tokens' rows and columns jump where tokens were pruned.
        after = start + max(layout[1], layout[2]) // 2
        assert len(k) < n and int(got[0, start + len(k)]) == after != start + len(k)
        assert (got[1:, start : start + len(k)].diff(dim=1) != 1).any()
        assert not torch.equal(got, torch.arange(length).expand(3, -1))
