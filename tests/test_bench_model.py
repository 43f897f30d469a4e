"""tiny:llava-bench keeps LLaVA-1.5-7B's LLM-to-vision FLOP ratio (so pruning speed-ups measured
on it transfer). Reads configs only: nothing is built or loaded."""

from __future__ import annotations

from pathlib import Path

from pipeline.bench.prefill import PROMPT
from pipeline.cost.flops import ModelShapes, prefill_flops, vision_flops
from pipeline.models import model_shapes
from pipeline.models.llava import LlavaAdapter
from pipeline.tiny.common import tiny_tokenizer
from pipeline.tiny.llava import CHAT_TEMPLATE, recipe_config

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "checkpoints" / "llava-1.5-7b-hf"


def test_bench_model_llm_to_vision_flops_ratio_matches_llava_1_5_7b() -> None:
    tokenizer = tiny_tokenizer()
    bench = LlavaAdapter.shapes(recipe_config("llava-bench", tokenizer))
    ref = model_shapes(str(REFERENCE), "llava")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    chat = tokenizer.apply_chat_template(conversation, chat_template=CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False)
    text_tokens = len(tokenizer(chat).input_ids) - 1  # the <image> placeholder becomes the visual tokens

    def ratio(shapes: ModelShapes) -> float:
        return prefill_flops(shapes.language, 576 + text_tokens) / vision_flops(shapes.vision, 576)

    assert 30 <= text_tokens <= 60  # the benchmark's prompt, not an empty one
    assert abs(ratio(bench) / ratio(ref) - 1) < 0.05, (ratio(bench), ratio(ref), text_tokens)
