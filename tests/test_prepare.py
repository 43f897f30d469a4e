"""The CPU/GPU split of each family's image processor: what the preparation stage emits (uint8
at the model's input size) and what the encode actor does with it (``PixelLUT``, Qwen's patchify)
give the stock processor's pixel values bit for bit; visual tokens cross between the GPU stages in
the model's dtype."""

from __future__ import annotations

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
from pipeline.models import from_wire, load_adapter, payload_bytes, payload_from_bytes, to_wire
from pipeline.models.base import PixelLUT
from pipeline.io.schema import answer_columns
from pipeline.tasks import one_answer
from pipeline.stages.decode import DecodeStage
from pipeline.stages.encode import EncodeStage
from pipeline.stages.prepare import PrepareStage
from pipeline.stages.text import TextStage
from pipeline.tiny.shapes_world import make_rows

FAMILIES = ["llava", "llava_next", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]
# Sizes that exercise every branch: landscape, portrait, near-square, an extreme aspect ratio,
# one below Qwen's min_pixels and one above the tiny Qwen's max_pixels.
SIZES = [(640, 480), (300, 500), (250, 260), (900, 120), (40, 60), (1000, 700)]


def _noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=FAMILIES)
def image_adapter(request: pytest.FixtureRequest, tiny_llava: str):
    path = tiny_llava if request.param == "llava" else f"tiny:{request.param}"
    return load_adapter(ModelConfig(path=path, family=request.param, device="cpu"), "image")


def test_prepared_pixels_are_the_processors_bit_for_bit(image_adapter) -> None:
    lut = PixelLUT(image_adapter.image_processor, torch.device("cpu"))
    for seed, (w, h) in enumerate(SIZES):
        image = _noise(w, h, seed)
        wire = payload_bytes(image_adapter.prepare_image(image))
        prepared = payload_from_bytes(wire)  # as it crosses Ray
        assert prepared["pixels"].dtype == torch.uint8
        if hasattr(image_adapter, "patchify"):  # Qwen: the processor resizes, normalises, then patchifies
            stock = image_adapter.image_processor(images=[image], size=image_adapter.size, return_tensors="pt")
            patches, grid = image_adapter.patchify(lut(prepared["pixels"], torch.float32))
            assert grid == stock["image_grid_thw"][0].tolist()
            assert torch.equal(patches, stock["pixel_values"])
            assert image_adapter.input_size(w, h) == tuple(prepared["pixels"].shape[:0:-1])
        else:
            stock = image_adapter.image_processor(images=[image], return_tensors="pt")
            pixels = stock["pixel_values"][0] if "image_sizes" in stock else stock["pixel_values"]
            assert torch.equal(lut(prepared["pixels"], torch.float32), pixels)
            if "image_sizes" in stock:
                assert prepared["image_size"].tolist() == stock["image_sizes"][0].tolist()
        # uint8 at the model's input size: about a quarter of the processor's float32 bytes or less
        # (Qwen's patches also repeat every pixel over the temporal patch: an eighth).
        assert len(wire) < stock["pixel_values"].numel() * 4 / 3.5


def test_the_lookup_table_is_the_processors_arithmetic_on_every_value() -> None:
    """Every uint8 value of every channel: the table equals rescale + normalize as the processor does them."""
    adapter = load_adapter(ModelConfig(path="tiny:qwen2_5_vl", device="cpu"), "image")
    ip = adapter.image_processor
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 16, 256)).copy()
    expected = ip.normalize(ip.rescale(values, ip.rescale_factor), ip.image_mean, ip.image_std)
    assert torch.equal(PixelLUT(ip, torch.device("cpu"))(values, torch.float32), torch.from_numpy(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensors_cross_the_wire_in_their_own_dtype(dtype: torch.dtype) -> None:
    t = torch.randn(7, 5).to(dtype)
    wire = to_wire(t)
    assert wire.nbytes == t.numel() * t.element_size()  # bf16 is 2 bytes a value, not float32's 4
    back = from_wire(wire)
    assert back.dtype == dtype and torch.equal(back, t)
    round_trip = payload_from_bytes(payload_bytes({"x": t, "grid": torch.tensor([1, 2, 3])}))
    assert round_trip["x"].dtype == dtype and torch.equal(round_trip["x"], t)
    assert round_trip["grid"].dtype == torch.long


def test_bf16_tokens_cross_between_the_gpu_stages_exactly_and_at_half_the_bytes(tiny_llava: str) -> None:
    """An encode actor running in bfloat16 (a GPU's dtype) sends its kept tokens as bf16: exactly
    the projector's output (the float32 copy pruning used is an exact upcast), 2 bytes a value,
    and the decode stage answers from them."""
    model = ModelConfig(path=tiny_llava, family="llava", device="cpu", dtype="bfloat16")
    rows = make_rows(3, seed=11)
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    batch = TextStage(TextStageConfig())(batch)
    batch = PrepareStage(model, InputConfig(path="x"), PrepareStageConfig())(batch)
    encode = EncodeStage(model, PruningConfig(keep=16), StageConfig())
    prepared = [payload_from_bytes(b) for b in batch["prepared_image"]]
    out = encode({k: v.copy() if isinstance(v, np.ndarray) else list(v) for k, v in batch.items()})
    reference = encode.adapter.encode_prepared(prepared)  # features in bf16, upcast to float32
    for i in range(3):
        wire = out["visual_kept"][i]  # one selection (one task): its 16 tokens
        assert wire.dtype == np.uint16 and wire.shape == (16, reference.features[i].shape[1])
        kept = torch.tensor(out["kept_indices"][i][0])
        assert torch.equal(from_wire(wire).float(), reference.features[i][kept])
    decode = DecodeStage(model, GenerationConfig(max_new_tokens=3), InputConfig(path="x"), DecodeStageConfig())
    answered = answer_columns(decode(out), one_answer())
    assert list(answered["error"]) == ["", "", ""] and all(g > 0 for g in answered["generated_tokens"])


def test_an_image_the_processor_refuses_is_that_rows_error_and_the_batch_goes_on() -> None:
    """Qwen's resize rule refuses aspect ratios over 200:1: that row is ``prepare failed``, its
    neighbours are prepared, and the image bytes stop at this stage."""
    import io

    def png(w: int, h: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (90, 20, 200)).save(buf, format="PNG")
        return buf.getvalue()

    batch = {"id": np.array(["ok", "strip", "ok2"], dtype=object), "image": np.array([png(64, 48), png(2010, 9),
             png(48, 64)], dtype=object), "error": np.array(["", "", ""], dtype=object)}
    stage = PrepareStage(ModelConfig(path="tiny:qwen2_5_vl", device="cpu"), InputConfig(path="x"), PrepareStageConfig())
    out = stage(batch)
    assert out["error"][0] == out["error"][2] == ""
    assert out["error"][1].startswith("prepare failed: ValueError: ") and "200" in out["error"][1]
    assert "image" not in out and out["prepared_image"][1] == b"" and out["prepare_ms"][1] == 0
    w, h = stage.adapter.input_size(48, 64)
    assert tuple(payload_from_bytes(out["prepared_image"][2])["pixels"].shape) == (3, h, w)
