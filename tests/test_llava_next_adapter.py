"""The LLaVA-NeXT adapter on tiny:llava_next: anyres counts, packed features and keep-all
generation equal to stock transformers; seed scores stay with their own patch through the
packing; pruned counts follow the budget rule and are what the LLM receives."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from pipeline.config import GenerationConfig
from pipeline.engines.hf import HFEngine
from pipeline.models import detect_family, model_shapes, token_counts
from pipeline.pruning import budget, get_method, relevance

from .family_setup import family_fixtures, requests

# Square, landscape, portrait, wide, small: different grids of tiles and different unpadding.
SIZES = [(336, 336), (640, 360), (300, 800), (1000, 500), (200, 260)]
PROMPTS = ["What color is the square?", "Is there a red circle?", "How many shapes?", "Describe it.", "Where is it?"]


def _stock(path: str) -> tuple:
    # Eager vision attention (as the adapter loads it) so the stock tower can return attentions.
    model = LlavaNextForConditionalGeneration.from_pretrained(path, attn_implementation={"vision_config": "eager"})
    return model.eval(), AutoProcessor.from_pretrained(path)


path, images, adapters, stock = family_fixtures("llava_next", SIZES, _stock)


@pytest.fixture(scope="module")
def encoded(adapters, images):
    return adapters[0].encode(images)  # one batch, five sizes: 3, 4 and 5 views


def test_counts_and_features_equal_what_the_stock_model_hands_its_llm(path, adapters, stock, images, encoded) -> None:
    vision, _ = adapters
    model, processor = stock
    assert detect_family(path) == "llava_next" and model_shapes(path).family == "llava_next"
    enc = encoded
    for i, img in enumerate(images):
        inputs = processor(images=img, text="USER: <image>\nHi ASSISTANT:", return_tensors="pt")
        stock_count = int((inputs["input_ids"] == model.config.image_token_id).sum())
        with torch.no_grad():
            ref = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        assert enc.features[i].shape[0] == stock_count, SIZES[i]
        torch.testing.assert_close(enc.features[i], ref.pooler_output[0].float())
        # The config alone predicts the same counts (what the cost planner uses).
        views = enc.encoder_patches[i] // 576
        assert token_counts(path, vision.cfg, *img.size) == (stock_count, enc.encoder_patches[i])
        assert 3 <= views <= 5 and enc.encoder_patches[i] == 576 * views
    counts = [f.shape[0] for f in enc.features]
    assert len(set(counts)) >= 3  # aspect ratio changes the count
    # More sizes for the config-only count (processor only, no model): the largest (square,
    # nothing unpadded: 576 + 48 * 48 + 48), very wide, very tall.
    for size in [(1000, 1000), (2000, 600), (60, 500)]:
        ids = processor(images=Image.new("RGB", size), text="<image>", return_tensors="pt")["input_ids"]
        expected = int((ids == model.config.image_token_id).sum())
        assert token_counts(path, vision.cfg, *size)[0] == expected <= 2928, size
    # Newline tokens (the image_newline embedding) score 0; every patch scores its CLS attention.
    newline = vision.core.image_newline.float()
    for f, s in zip(enc.features, enc.seed_scores, strict=True):
        is_newline = (f == newline).all(dim=-1)
        assert s.shape == (f.shape[0],) and is_newline.any() and torch.isfinite(s).all()
        assert (s[is_newline] == 0).all() and (s[~is_newline] > 0).all()


def test_seed_scores_stay_with_their_own_patch_through_packing(adapters, stock) -> None:
    """Every packed token is matched to the (view, patch) whose projected feature it is, from the
    stock tower run view by view; its score must be that view's CLS attention to that patch."""
    vision, _ = adapters
    model, processor = stock
    g = torch.Generator().manual_seed(0)
    # Noise, so no two (view, patch) features coincide; landscape and portrait: rows and columns cut.
    noise = [
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
        for w, h in [(640, 360), (300, 800)]
    ]
    enc = vision.encode(noise)
    pixels = processor.image_processor(images=noise, return_tensors="pt")["pixel_values"]
    for i, (f, s) in enumerate(zip(enc.features, enc.seed_scores, strict=True)):
        views = enc.encoder_patches[i] // 576
        with torch.no_grad():
            out = model.model.vision_tower(pixels[i, :views], output_hidden_states=True, output_attentions=True)
            per_patch = model.model.multi_modal_projector(out.hidden_states[-2][:, 1:]).flatten(0, 1)  # [V * 576, D]
        cls = out.attentions[-2][:, :, 0, 1:].mean(1).flatten()  # layer producing hidden_states[-2]
        is_newline = (f == vision.core.image_newline.float()).all(dim=-1)
        distance = torch.cdist(f[~is_newline], per_patch, compute_mode="donot_use_mm_for_euclid_dist")
        nearest = distance.topk(2, largest=False)
        match = nearest.indices[:, 0]
        assert (nearest.values[:, 0] < 1e-3 * nearest.values[:, 1]).all()  # each token is one patch
        assert len(set(match.tolist())) == len(match)  # and no patch appears twice
        assert torch.equal(match[:576], torch.arange(576))  # the base view first, in raster order
        assert int((match >= 576).sum()) == len(match) - 576 and len(match) < views * 576  # tiles, unpadded
        torch.testing.assert_close(s[~is_newline], cls[match])
        assert (s[is_newline] == 0).all()


def test_keep_all_generation_equals_stock_generate(adapters, stock, images, encoded) -> None:
    _, language = adapters
    model, processor = stock
    enc = encoded
    gen = GenerationConfig(max_new_tokens=8)
    kept = [torch.arange(f.shape[0]) for f in enc.features]
    ours = HFEngine(language).generate(requests(PROMPTS, enc.features, kept, enc.payloads), gen)
    for i, img in enumerate(images):
        inputs = processor(images=img, text=language.chat_text(PROMPTS[i]), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        assert ours[i].token_ids == out.tolist()[: len(ours[i].token_ids)], SIZES[i]
        assert ours[i].prompt_tokens == inputs["input_ids"].shape[1]
    assert len({tuple(g.token_ids) for g in ours}) > 1  # answers depend on the image


def test_pruned_counts_follow_the_budget_and_the_llm_receives_them(adapters, encoded) -> None:
    vision, language = adapters
    words = vision.embed_words([["square"], ["circle"]])
    rows = zip(encoded.features[1:3], encoded.seed_scores[1:3], words, PROMPTS[1:3], strict=True)
    for f, s, w, prompt in rows:
        keep = budget(f.shape[0], prune_ratio=0.889)
        idx = get_method("resprune")(f, keep, relevance=relevance(f, w), scores=s)
        kept = idx.sort().values
        assert len(kept) == keep == len(set(kept.tolist()))
        assert int(idx[0]) == int(s.argmax())  # seeded on the highest CLS attention
        # Newlines are one vector: once one is kept the others have no residual left, so while the
        # kept tokens span less than the features' rank (at most D = 256 here) at most one survives.
        is_newline = (f == vision.core.image_newline.float()).all(dim=-1)
        few = get_method("resprune")(f, 32, relevance=relevance(f, w), scores=s)
        assert int(is_newline[few].sum()) <= 1 < int(is_newline.sum())
        captured = []
        handle = language.model.model.language_model.register_forward_pre_hook(
            lambda _m, _a, kwargs: captured.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True
        )
        try:
            out = HFEngine(language).generate(requests([prompt], [f[kept]], [kept]), GenerationConfig(max_new_tokens=3))
            out = out[0]
        finally:
            handle.remove()
        ids = language.tokenizer(language.chat_text(prompt)).input_ids
        p = ids.index(language.image_token_id)
        assert out.prompt_tokens == len(ids) - 1 + keep == captured[0].shape[1]  # text tokens + K
        torch.testing.assert_close(captured[0][0, p : p + keep], f[kept])  # the kept tokens, packed order
        assert 1 <= out.generated_tokens <= 3


def test_tiny_checkpoint_is_deterministic(stock) -> None:
    from pipeline.tiny.llava_next import new_tiny_llava_next

    saved = stock[0].state_dict()  # built by another call and loaded back from disk
    fresh = new_tiny_llava_next()[0].state_dict()
    assert saved.keys() == fresh.keys() and all(torch.equal(saved[k], fresh[k]) for k in saved)
