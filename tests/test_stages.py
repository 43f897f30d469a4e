"""Stage classes on real batches (the callables Ray's actor pools run), without Ray."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import (
    DecodeStageConfig,
    GenerationConfig,
    InputConfig,
    ModelConfig,
    PrepareStageConfig,
    PruningConfig,
    StageConfig,
    TextStageConfig,
)
from pipeline.engines import DecodeRequest
from pipeline.engines.hf import HFEngine
from pipeline.models import payload_from_bytes
from pipeline.io.schema import COST_COLUMNS, OUTPUT_SCHEMA, answer_columns
from pipeline.pruning import gate, relevance, resprune_select
from pipeline.stages.common import map_splitting_failures
from pipeline.stages.decode import DecodeStage
from pipeline.stages.encode import EncodeStage
from pipeline.stages.prepare import PrepareStage
from pipeline.io.images import decode_image
from pipeline.stages.text import TextStage
from pipeline.tasks import one_answer
from pipeline.tiny.shapes_world import make_rows

MODEL = ModelConfig(path="tiny:llava")


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def batch(tiny_llava: str) -> dict:
    rows = make_rows(6, seed=3)
    rows[1]["prompt"] = None  # missing prompt
    rows[2]["image"] = b"\xff\xd8\xff garbage"  # corrupt JPEG
    rows[3]["image"] = _png(1200, 1000)  # over the limit below
    rows[4]["image"] = None  # missing image
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


@pytest.fixture(scope="module")
def text_out(batch: dict) -> dict:
    return TextStage(TextStageConfig())(dict(batch))


def _copy(batch: dict) -> dict:
    return {k: v.copy() if isinstance(v, np.ndarray) else list(v) for k, v in batch.items()}


def _prepared(model: ModelConfig, batch: dict, inputs: InputConfig | None = None) -> dict:
    """``batch`` through the CPU preparation stage (decode + the processor's resize), as the job does."""
    return PrepareStage(model, inputs or InputConfig(path="x"), PrepareStageConfig())(_copy(batch))


@pytest.fixture(scope="module")
def prepare_out(tiny_llava: str, text_out: dict) -> dict:
    return _prepared(MODEL, text_out, InputConfig(path="x", max_image_pixels=1_000_000))


@pytest.fixture(scope="module")
def encode_stage(tiny_llava: str) -> EncodeStage:
    return EncodeStage(MODEL, PruningConfig(keep=32), StageConfig())


@pytest.fixture(scope="module")
def encode_out(encode_stage: EncodeStage, prepare_out: dict) -> dict:
    return encode_stage(_copy(prepare_out))


def test_text_stage(text_out: dict) -> None:
    assert list(text_out["error"]) == ["", "missing prompt", "", "", "", ""]
    nouns = [n[0] for n in text_out["task_nouns"]]  # one task: the row's prompt
    assert nouns[1] == [] and list(text_out["task_error"][1]) == ["missing prompt"]
    assert all(nouns[i] for i in (0, 2, 3, 4))
    assert nouns[5] == []  # "Describe the image.": a noun naming the image itself guides nothing
    assert "answer" not in nouns[0] and "phrase" not in nouns[0]  # instructions cleaned
    assert set(text_out["extractor"]) == {"heuristic:spacy-blank-en"}


def test_prepare_stage_row_errors_and_compact_pixels(prepare_out: dict) -> None:
    """Image errors come from the CPU stage, worded by pipeline.io.images; good rows carry uint8
    pixels at the model's input size (a quarter of the float32 the processor would emit)."""
    errors = list(prepare_out["error"])
    assert errors[2].startswith("corrupt image: ") and errors[4] == "missing image: null"
    assert errors[3] == "image too large: 1200x1000 = 1200000 pixels > input.max_image_pixels = 1000000"
    assert "image" not in prepare_out
    assert [bool(b) for b in prepare_out["prepared_image"]] == [True, False, False, False, False, True]
    pixels = payload_from_bytes(prepare_out["prepared_image"][0])["pixels"]
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (1, 3, 336, 336)
    assert len(prepare_out["prepared_image"][0]) < 1.01 * pixels.numel() < 4 * pixels.numel()
    assert prepare_out["prepare_ms"][0] > 0 and prepare_out["prepare_ms"][2] == 0


def test_encode_stage_row_errors_and_pruning(encode_stage: EncodeStage, encode_out: dict, text_out: dict) -> None:
    errors = list(encode_out["error"])
    assert errors[0] == "" and errors[5] == ""
    assert errors[1] == "missing prompt"
    assert errors[2].startswith("corrupt image: ")
    assert errors[3] == "image too large: 1200x1000 = 1200000 pixels > input.max_image_pixels = 1000000"
    assert errors[4] == "missing image: null"
    assert "image" not in encode_out and "prepared_image" not in encode_out
    assert list(encode_out["visual_tokens_in"]) == [576, 0, 0, 0, 0, 576]
    assert [[len(k) for k in s] for s in encode_out["kept_indices"]] == [[32], [], [], [], [], [32]]
    assert [list(s) for s in encode_out["task_selection"]] == [[0], [-1], [-1], [-1], [-1], [0]]
    assert encode_out["relevance_min"][1] == []

    # Independent recomputation for row 0: encode, embed nouns, ResPrune with CLS seed, sort.
    img = Image.open(io.BytesIO(text_out["image"][0])).convert("RGB")
    enc = encode_stage.adapter.encode([img])
    words = encode_stage.adapter.embed_words([list(text_out["task_nouns"][0][0])])
    expected = resprune_select(enc.features[0], 32, text=words[0], alpha=0.75, seed=enc.seed_scores[0]).sort().values
    assert encode_out["kept_indices"][0] == [expected.tolist()]
    np.testing.assert_allclose(encode_out["visual_kept"][0], enc.features[0][expected].numpy(), rtol=1e-5, atol=1e-5)
    r = relevance(enc.features[0], words[0])
    assert encode_out["relevance_max"][0][0] == pytest.approx(float(r.max()))
    assert float(gate(r, 0.75).min()) > 0


@pytest.mark.parametrize(("method", "kept"), [("none", 576), ("divprune", 40), ("score_topk", 40), ("random", 40)])
def test_encode_stage_methods(tiny_llava: str, text_out: dict, method: str, kept: int) -> None:
    stage = EncodeStage(MODEL, PruningConfig(method=method, keep=40), StageConfig())
    one = {k: v[:1].copy() if isinstance(v, np.ndarray) else list(v[:1]) for k, v in text_out.items()}
    out = stage(_prepared(MODEL, one))
    assert len(out["kept_indices"][0][0]) == kept and out["method"][0] == method
    assert out["kept_indices"][0][0] == sorted(out["kept_indices"][0][0])
    assert out["relevance_mean"][0] == [None]  # only text-guided methods compute relevance


def test_decode_stage_and_output_schema(tiny_llava: str, encode_out: dict) -> None:
    stage = DecodeStage(MODEL, GenerationConfig(max_new_tokens=5), InputConfig(path="x"), DecodeStageConfig())
    out = stage({k: v.copy() if isinstance(v, np.ndarray) else list(v) for k, v in encode_out.items()})
    assert "visual_kept" not in out
    assert [bool(a[0]) for a in out["task_answer"]] == [True, False, False, False, False, True]
    assert out["task_prompt_tokens"][0][0] > 32 and out["task_prompt_tokens"][1][0] == 0
    assert 1 <= out["task_generated_tokens"][0][0] <= 5
    from pipeline.config import load_config
    from pipeline.job import cost_model, finalize

    from .conftest import REPO

    cfg = load_config(REPO / "configs/local.yaml", {"model.path": tiny_llava, "model.family": "llava"})
    table = finalize(out, cost_model(cfg))  # the job's last step: cost columns, then the output schema
    assert table.schema.names[: len(OUTPUT_SCHEMA)] == OUTPUT_SCHEMA.names
    assert "image" not in table.schema.names and "expected" in table.schema.names
    assert table.num_rows == 6
    assert table.column("relevance_min").null_count == 5  # the 4 error rows and the caption (no nouns)
    assert all(table.column(c).null_count == 4 for c in COST_COLUMNS)  # the 4 error rows
    assert table.column("flops_total")[0].as_py() > 0 and table.column("cost_usd")[5].as_py() > 0


def test_row_fallback_isolates_the_failing_row() -> None:
    def square(xs: list[int]) -> list[int]:
        if 3 in xs:
            raise RuntimeError("bad row")
        return [x * x for x in xs]

    assert map_splitting_failures(square, [1, 2, 4], "square") == [1, 4, 16]
    out = map_splitting_failures(square, [1, 3, 4], "square")
    assert out[0] == 1 and out[2] == 16 and out[1] == "square failed: RuntimeError: bad row"


def test_decode_image_formats() -> None:
    rows = make_rows(3)  # JPEG, PNG, WebP
    assert all(isinstance(decode_image(r["image"], 10**7, 8), Image.Image) for r in rows)
    assert decode_image(b"", 10**7, 8) == "missing image: 0 bytes"


def _decode_batch(encode_out: dict, rows: list[int], prompts: list[str]) -> dict:
    batch = {k: (v[rows].copy() if isinstance(v, np.ndarray) else [v[i] for i in rows]) for k, v in encode_out.items()}
    batch["task_prompt"] = [[p] for p in prompts]
    return batch


def _answers(out: dict) -> dict:
    """The one-answer view of a decode stage's output (what the job writes without a task spec)."""
    return answer_columns(out, one_answer())


def test_decode_stage_rejects_or_truncates_long_prompts(tiny_llava: str, encode_out: dict) -> None:
    long = "Describe the shapes and their colours in detail. " * 2000  # ~100k characters
    gen = GenerationConfig(max_new_tokens=3)
    reject = DecodeStage(MODEL, gen, InputConfig(path="x"), DecodeStageConfig())
    context = reject.adapter.context_length
    assert reject.adapter.text_tokens(long) > context
    out = _answers(reject(_decode_batch(encode_out, [0, 5], [long, "What colour is the circle?"])))
    assert out["error"][0].startswith("prompt too long: ") and f"context of {context}" in out["error"][0]
    assert out["answer"][0] == "" and out["answer"][1] and not any(out["prompt_truncated"])

    limited = DecodeStage(MODEL, gen, InputConfig(path="x", max_prompt_tokens=40), DecodeStageConfig())
    out = _answers(limited(_decode_batch(encode_out, [0], ["word " * 60])))
    tokens = limited.adapter.text_tokens("word " * 60)
    assert tokens > 60 and out["error"][0] == f"prompt too long: {tokens} tokens > input.max_prompt_tokens = 40"

    cut = DecodeStage(MODEL, gen, InputConfig(path="x", max_prompt_tokens=40, long_prompt="truncate"), DecodeStageConfig())
    out = _answers(cut(_decode_batch(encode_out, [0, 5], [long, "What colour is the circle?"])))
    assert list(out["error"]) == ["", ""] and out["answer"][0] and list(out["prompt_truncated"]) == [True, False]
    assert out["prompt_tokens"][0] <= 40 + 32  # the cut prompt and the 32 kept visual tokens
    fitted = cut.adapter.fit_prompt(long, 40)
    assert long.startswith(fitted[:100]) and 30 < cut.adapter.text_tokens(fitted) <= 40


def test_decode_stage_bounds_padded_tokens_per_call(tiny_llava: str, encode_out: dict) -> None:
    stage = DecodeStage(MODEL, GenerationConfig(max_new_tokens=2), InputConfig(path="x"),
                        DecodeStageConfig(max_batch_tokens=400))
    prompts = ["Is it red?", "word " * 150, "What colour is the square?", "word " * 10]
    batch = _decode_batch(encode_out, [0, 5, 0, 5], prompts)
    calls = []
    real = stage.adapter.hf_inputs  # once per engine call: count the calls, run them for real
    stage.adapter.hf_inputs = lambda requests: calls.append(len(requests)) or real(requests)
    out = _answers(stage(batch))
    assert all(out["answer"]) and not any(out["error"])
    # The 190-token row runs alone; the three short ones (under 100 tokens with 32 visual) share a call.
    assert sorted(calls) == [1, 3]


def test_split_on_failure_retries_halves_and_isolates_bad_rows() -> None:
    seen: list[int] = []
    flaky = {"left": 1}

    def fn(xs: list[int]) -> list[int]:
        seen.append(len(xs))
        if len(xs) == 8 and flaky["left"]:  # a transient fault on the whole batch
            flaky["left"] -= 1
            raise RuntimeError("transient")
        if 6 in xs:
            raise ValueError("poison")
        return [-x for x in xs]

    out = map_splitting_failures(fn, list(range(8)), "step")
    assert out[:6] == [0, -1, -2, -3, -4, -5] and out[7] == -7 and out[6] == "step failed: ValueError: poison"
    assert seen == [8, 4, 4, 2, 2, 1, 1]  # halves, then smaller only where the poison is: 7 calls, not 8 rows + 1


def test_deepstack_levels_travel_with_the_kept_tokens_through_the_stages(text_out: dict) -> None:
    """Qwen3-VL: the encode stage keeps the SAME indices in every DeepStack level as in the main
    tokens (in the row's payload, with its grid), and the decode stage hands them to the LLM: its
    answers are the HF engine's on exactly those rows (and another family's rows carry no payload)."""
    model = ModelConfig(path="tiny:qwen3_vl", device="cpu")
    encode = EncodeStage(model, PruningConfig(prune_ratio=0.75), StageConfig())
    rows = [0, 5]  # two valid rows of different image sizes
    two = {k: v[rows].copy() if isinstance(v, np.ndarray) else [v[i] for i in rows] for k, v in text_out.items()}
    out = encode(_prepared(model, two))
    images = [Image.open(io.BytesIO(text_out["image"][i])).convert("RGB") for i in rows]
    enc = encode.adapter.encode(images)
    assert enc.features[0].shape[0] != enc.features[1].shape[0]
    payloads = [payload_from_bytes(b[0]) for b in out["visual_payload"]]
    for i in range(2):
        kept = out["kept_indices"][i][0]
        assert len(kept) < out["visual_tokens_in"][i]
        assert set(payloads[i]) == {"grid_thw", "deepstack"}
        assert torch.equal(payloads[i]["grid_thw"], enc.payloads[i]["grid_thw"])
        np.testing.assert_allclose(payloads[i]["deepstack"].numpy(), enc.payloads[i]["deepstack"][:, kept].numpy(),
                                   rtol=1e-5, atol=1e-5)
    decode = DecodeStage(model, GenerationConfig(max_new_tokens=6), InputConfig(path="x"), DecodeStageConfig())
    answers = _answers(decode({k: v.copy() if isinstance(v, np.ndarray) else list(v) for k, v in out.items()}))
    assert "visual_payload" not in answers
    direct = HFEngine(decode.adapter).generate(
        [DecodeRequest(str(out["id"][i]), str(out["prompt"][i]), torch.from_numpy(np.array(out["visual_kept"][i])),
                       torch.tensor(out["kept_indices"][i][0]), payloads[i]) for i in range(2)],
        GenerationConfig(max_new_tokens=6),
    )
    assert list(answers["answer"]) == [g.text for g in direct]


def test_families_without_a_payload_carry_none(encode_out: dict) -> None:
    assert all(payload_from_bytes(p) == {} for s in encode_out["visual_payload"] for p in s)


def test_an_error_from_a_live_engine_stays_a_row_error_under_the_watchdog(
    tiny_llava: str, encode_out: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog ends the actor only for a dead or stuck engine: an exception from a live one
    reaches the stage, which splits the call down to the failing row (this process lives on)."""
    import json

    from pipeline.stages import faults

    stage = DecodeStage(MODEL, GenerationConfig(max_new_tokens=2), InputConfig(path="x"), DecodeStageConfig())
    batch = _decode_batch(encode_out, [0, 5, 0], ["Is it red?", "What colour is the square?", "Is it blue?"])
    batch["id"] = np.array(["a", "b", "c"], dtype=object)
    monkeypatch.setenv(faults.ENV, json.dumps([{"stage": "decode", "fail_ids": ["b"]}]))
    faults._faults.cache_clear()
    try:
        out = _answers(stage(batch))
    finally:
        faults._faults.cache_clear()
    assert out["error"][1].startswith("decode failed: InjectedFault") and out["answer"][1] == ""
    assert out["answer"][0] and out["answer"][2] and not out["error"][0] and not out["error"][2]
