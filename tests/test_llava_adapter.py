"""The LLaVA-1.5 adapter on the tiny real checkpoint: split path == stock transformers."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from pipeline.config import GenerationConfig, ModelConfig
from pipeline.engines.hf import HFEngine
from pipeline.models import detect_family, load_adapter
from pipeline.pruning import relevance, resprune_select
from pipeline.tiny import build
from pipeline.tiny.shapes_world import make_rows

from .family_setup import requests

PROMPTS = [
    "What color is the circle?",
    "Is there a blue square at the top left of the picture? Please answer yes or no.",
    "How many shapes?",
]


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in make_rows(3, seed=5)]


@pytest.fixture(scope="module")
def vision(tiny_llava: str):
    return load_adapter(ModelConfig(path="tiny:llava"), "vision")


@pytest.fixture(scope="module")
def language(tiny_llava: str):
    return load_adapter(ModelConfig(path="tiny:llava"), "language")


def test_checkpoint_has_llava_1_5_structure(tiny_llava: str, vision, images) -> None:
    assert detect_family(tiny_llava) == "llava"
    enc = vision.encode(images)
    assert len(enc.features) == 3 and enc.features[0].shape == (576, 256)
    cls = enc.seed_scores[0]
    assert cls.shape == (576,) and (cls >= 0).all()
    assert 0.0 < float(cls.sum()) < 1.0  # softmax row minus CLS's attention to itself


def test_encode_matches_transformers_get_image_features(tiny_llava: str, vision, images) -> None:
    processor = AutoProcessor.from_pretrained(tiny_llava)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava, attn_implementation="eager").eval()
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=-2, vision_feature_select_strategy="default", output_attentions=True
        )
    enc = vision.encode(images)
    for b in range(3):
        torch.testing.assert_close(enc.features[b], ref.pooler_output[b].float())
        # CLS row of the layer that produces hidden_states[-2], mean over heads.
        torch.testing.assert_close(enc.seed_scores[b], ref.attentions[-2][b, :, 0, 1:].mean(0))


def test_keep_all_split_path_equals_stock_generate(tiny_llava: str, vision, language, images) -> None:
    gen = GenerationConfig(max_new_tokens=12)
    enc = vision.encode(images)
    assert enc.payloads == [{}, {}, {}]  # the kept tokens are all LLaVA's LLM needs
    ours = HFEngine(language).generate(requests(PROMPTS, enc.features, [torch.arange(576)] * 3), gen)

    processor = AutoProcessor.from_pretrained(tiny_llava)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava).eval()
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True
    ) for p in PROMPTS]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        stock = model.generate(**inputs, max_new_tokens=12, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    for row, expected in zip(ours, stock.tolist(), strict=True):
        assert row.token_ids == expected[: len(row.token_ids)]
        assert len(row.token_ids) == 12 or expected[len(row.token_ids) - 1] == model.generation_config.eos_token_id
    # The answers differ between images: the test would notice features being ignored.
    assert len({tuple(r.token_ids) for r in ours}) > 1


def test_llm_receives_exactly_the_kept_tokens_in_spatial_order(vision, language, images) -> None:
    enc = vision.encode(images[:1])
    words = vision.embed_words([["circle", "color"]])
    keep = 64
    idx = resprune_select(enc.features[0], keep, text=words[0], seed=enc.seed_scores[0])
    kept = idx.sort().values
    assert not torch.equal(kept, idx)  # selection order is not spatial order: sorting matters

    captured = []
    lm = language.model.model.language_model
    handle = lm.register_forward_pre_hook(
        lambda _m, _a, kwargs: captured.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True
    )
    try:
        out = HFEngine(language).generate(requests([PROMPTS[0]], [enc.features[0][kept]], [kept]),
                                          GenerationConfig(max_new_tokens=3))
    finally:
        handle.remove()

    prefill = captured[0][0]
    ids = language.tokenizer(language.chat_text(PROMPTS[0])).input_ids
    p = ids.index(language.image_token_id)
    assert prefill.shape[0] == len(ids) - 1 + keep == out[0].prompt_tokens
    torch.testing.assert_close(prefill[p : p + keep], enc.features[0][kept])
    text_embeds = language.embed(torch.tensor(ids))
    torch.testing.assert_close(prefill[:p], text_embeds[:p])
    torch.testing.assert_close(prefill[p + keep :], text_embeds[p + 1 :])


def test_embed_words_uses_the_llm_embedding_table(vision) -> None:
    emb = vision.embed_words([["circle", "dog"], []])
    ids = [i for w in ("circle", "dog") for i in vision.tokenizer(w, add_special_tokens=False).input_ids]
    torch.testing.assert_close(emb[0], vision.embed.weight[ids].float())
    assert emb[1].shape == (0, 256)
    assert relevance(torch.randn(5, 256), emb[1]).isnan().all()


def test_tiny_checkpoint_is_deterministic(tmp_path, tiny_llava: str) -> None:
    from safetensors.torch import load_file

    rebuilt = build("llava", tmp_path / "again")
    a, b = load_file(f"{tiny_llava}/model.safetensors"), load_file(f"{rebuilt}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
