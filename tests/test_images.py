from __future__ import annotations

import io
import re
import time
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.io.images import IMAGE_ERROR_KINDS, decode_image

BIG = 10**9  # max_pixels that never triggers


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def ok(data: object, max_pixels: int = BIG, min_side: int = 1) -> Image.Image:
    out = decode_image(data, max_pixels, min_side)
    assert isinstance(out, Image.Image), out
    assert out.mode == "RGB"
    return out


def kind(err: str) -> str:
    return err.split(":", 1)[0]


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 2) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_valid_formats_decode_to_rgb_same_size(fmt: str) -> None:
    out = ok(encode(noise(37, 23), fmt))
    assert out.size == (37, 23)
    out.tobytes()  # pixels are there


def test_png_pixels_exact() -> None:
    img = noise(16, 9)
    assert ok(encode(img, "PNG")).tobytes() == img.tobytes()


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, np.bytes_])
def test_bytes_like_accepted(wrap: type) -> None:
    assert ok(wrap(encode(noise(8, 8), "PNG"))).size == (8, 8)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (None, "missing image: null"),
        (b"", "missing image: 0 bytes"),
        (bytearray(), "missing image: 0 bytes"),
        (memoryview(b""), "missing image: 0 bytes"),
        ("not bytes", "missing image: not bytes (str)"),
        (123, "missing image: not bytes (int)"),
    ],
)
def test_missing(data: object, expected: str) -> None:
    assert decode_image(data, BIG, 1) == expected


def test_random_bytes_corrupt() -> None:
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    out = decode_image(data, BIG, 1)
    assert isinstance(out, str) and out.startswith("corrupt image: UnidentifiedImageError: ")
    assert len(out) < 300


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_is_corrupt(fmt: str) -> None:
    data = encode(noise(64, 64), fmt)
    assert isinstance(decode_image(data, BIG, 1), Image.Image)
    out = decode_image(data[: len(data) // 2], BIG, 1)
    assert isinstance(out, str) and out.startswith("corrupt image: "), out
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_too_large_from_header_without_decoding() -> None:
    data = encode(Image.new("L", (5000, 5000), 7), "PNG")  # constant: small file, 25M pixels
    start = time.perf_counter()
    out = decode_image(data, 1_000_000, 1)
    elapsed = time.perf_counter() - start
    assert out == "image too large: 5000x5000 = 25000000 pixels > input.max_image_pixels = 1000000"
    assert elapsed < 0.05  # decoding 25M pixels takes far longer
    assert isinstance(decode_image(encode(noise(1000, 1000), "PNG"), 1_000_000, 1), Image.Image)  # = limit is fine


@pytest.mark.parametrize("side", [12, 20])  # PIL warns above MAX_IMAGE_PIXELS (144 > 100), raises above 2x (400)
def test_pil_decompression_bomb_is_too_large(monkeypatch: pytest.MonkeyPatch, side: int) -> None:
    data = encode(noise(side, side), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decode_image(data, BIG, 1)
    assert isinstance(out, str) and out.startswith("image too large: "), out
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_pil_global_limit_untouched() -> None:
    assert Image.MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)


def test_min_side() -> None:
    assert decode_image(encode(Image.new("RGB", (1, 1)), "PNG"), BIG, 8) == (
        "image too small: 1x1 < input.min_image_side = 8"
    )
    assert decode_image(encode(Image.new("RGB", (100, 7)), "PNG"), BIG, 8) == (
        "image too small: 100x7 < input.min_image_side = 8"
    )
    assert ok(encode(Image.new("RGB", (8, 8)), "PNG"), min_side=8).size == (8, 8)


def test_cmyk_jpeg_colour() -> None:
    out = ok(encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG"))
    assert close(out.getpixel((8, 8)), (0, 255, 255), tol=3)


@pytest.mark.parametrize("mode", ["L", "1", "YCbCr", "LAB"])
def test_other_modes_convert(mode: str) -> None:
    img = noise(8, 8, mode)
    data = encode(img, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    out = ok(data)
    assert out.size == (8, 8)
    assert out.tobytes() == img.convert("RGB").tobytes()


def test_ycbcr_colour() -> None:
    img = Image.new("RGB", (8, 8), (200, 30, 90)).convert("YCbCr")
    assert close(ok(encode(img, "TIFF")).getpixel((0, 0)), (200, 30, 90), tol=3)


def test_hsv_converts(monkeypatch: pytest.MonkeyPatch) -> None:
    img = Image.new("RGB", (8, 8), (0, 0, 255)).convert("HSV")  # no file format stores HSV
    monkeypatch.setattr(Image, "open", lambda fp: img)
    assert close(ok(b"anything").getpixel((0, 0)), (0, 0, 255))


def test_grey_l_exact() -> None:
    assert ok(encode(Image.new("L", (4, 4), 77), "PNG")).getpixel((0, 0)) == (77, 77, 77)


@pytest.mark.parametrize(("value", "grey"), [(65535, 255), (32768, 128), (0, 0), (257, 1)])
def test_16bit_png_scaled(value: int, grey: int) -> None:
    data = encode(Image.new("I;16", (4, 4), value), "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    assert ok(data).getpixel((1, 1)) == (grey, grey, grey)


def test_16bit_not_naively_clipped() -> None:
    img = Image.new("I;16", (4, 4), 32768)
    assert img.convert("L").getpixel((0, 0)) == 255  # what PIL's own convert does
    assert ok(encode(img, "PNG")).getpixel((0, 0)) != (255, 255, 255)


@pytest.mark.parametrize("mode", ["I;16B", "I;16L"])
def test_16bit_variants(mode: str) -> None:
    img = Image.new(mode, (4, 4), 32768)
    data = encode(img, "TIFF")
    assert ok(data).getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize(("value", "grey"), [(65535, 255), (32768, 128), (70000, 255), (-5, 0)])
def test_mode_i(value: int, grey: int) -> None:
    data = encode(Image.new("I", (4, 4), value), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert ok(data).getpixel((0, 0)) == (grey, grey, grey)


@pytest.mark.parametrize(
    ("values", "greys"),
    [((0.0, 0.5, 1.0), (0, 128, 255)), ((0.0, 100.0, 300.0), (0, 100, 255)), ((-1.0, 0.25, 0.5), (0, 64, 128))],
)
def test_mode_f(values: tuple[float, ...], greys: tuple[int, ...]) -> None:
    arr = np.array([values], dtype=np.float32)
    data = encode(Image.fromarray(arr, "F"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    out = ok(data)
    assert [out.getpixel((x, 0))[0] for x in range(3)] == list(greys)


def test_la_transparent_pixel_is_white() -> None:
    img = Image.new("LA", (2, 1))
    img.putpixel((0, 0), (0, 0))  # black, fully transparent
    img.putpixel((1, 0), (50, 255))  # opaque grey
    out = ok(encode(img, "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (50, 50, 50)


def test_p_with_transparency_index() -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 0] + [0] * (254 * 3))  # 0: red, 1: black
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    data = encode(img, "PNG", transparency=1)
    src = Image.open(io.BytesIO(data))
    assert src.mode == "P" and src.info.get("transparency") == 1
    out = ok(data)
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((1, 0)) == (255, 255, 255)


def test_p_without_transparency() -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 0, 0, 0] + [0] * (254 * 3))
    assert ok(encode(img, "PNG")).getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize(("mode", "colour", "key"), [("RGB", (0, 0, 0), (0, 0, 0)), ("L", 0, 0)])
def test_transparency_key_is_white(mode: str, colour: object, key: object) -> None:
    img = Image.new(mode, (2, 1), colour)
    img.putpixel((1, 0), (90, 90, 90) if mode == "RGB" else 90)
    data = encode(img, "PNG", transparency=key)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    out = ok(data)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (90, 90, 90)


def test_rgba_half_transparent_red_over_white() -> None:
    px = ok(encode(Image.new("RGBA", (4, 4), (255, 0, 0, 128)), "PNG")).getpixel((0, 0))
    assert px[0] == 255 and abs(px[1] - 128) <= 1 and abs(px[2] - 128) <= 1


def test_rgba_transparent_black_is_white_not_black() -> None:
    assert ok(encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG")).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(("fmt", "kw"), [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})])
def test_animated_first_frame(fmt: str, kw: dict) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert ok(data).getpixel((4, 4)) == (255, 0, 0)


def test_exif_orientation_applied() -> None:
    img = Image.new("RGB", (20, 10), (200, 200, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(img, "JPEG", exif=exif)
    assert Image.open(io.BytesIO(data)).size == (20, 10)
    assert ok(data).size == (10, 20)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_broken_exif_does_not_error() -> None:
    data = encode(Image.new("RGB", (20, 10), (200, 200, 200)), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\xff")
    assert ok(data).size == (20, 10)


def test_exif_transpose_failure_keeps_image(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(img: Image.Image) -> Image.Image:
        raise SyntaxError("bad EXIF")

    monkeypatch.setattr("pipeline.io.images.ImageOps.exif_transpose", broken)
    assert ok(encode(Image.new("RGB", (20, 10), (200, 200, 200)), "JPEG")).size == (20, 10)


def test_unsupported_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    img = Image.new("La", (8, 8))  # no file format yields it, and PIL cannot convert it
    monkeypatch.setattr(Image, "open", lambda fp: img)
    assert decode_image(b"anything", BIG, 1) == "unsupported image mode: La"


def test_every_error_kind_is_declared(monkeypatch: pytest.MonkeyPatch) -> None:
    png = encode(noise(40, 40), "PNG")
    errors = [
        decode_image(None, BIG, 1),
        decode_image(b"", BIG, 1),
        decode_image(3.5, BIG, 1),
        decode_image(b"\x00" * 100, BIG, 1),
        decode_image(png[: len(png) // 2], BIG, 1),
        decode_image(png, 100, 1),
        decode_image(png, BIG, 41),
    ]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    errors.append(decode_image(png, BIG, 1))
    monkeypatch.setattr(Image, "open", lambda fp: Image.new("La", (8, 8)))
    errors.append(decode_image(b"x", BIG, 1))
    assert all(isinstance(e, str) for e in errors), errors
    assert {kind(e) for e in errors} == set(IMAGE_ERROR_KINDS)
    assert len(set(IMAGE_ERROR_KINDS)) == len(IMAGE_ERROR_KINDS)


# Fast JPEG decoding (``draft``): PIL's draft mode picks a DCT scale (1/2, 1/4, 1/8) before any pixel
# is decoded; the rules below are decode_image's contract for it.


def smooth(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth random image (a coarse noise field upsampled): a scaled decode stays close to it."""
    arr = np.random.default_rng(seed).integers(0, 256, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").resize((w, h), Image.Resampling.BICUBIC)


class Recorder:
    """A ``draft`` callable that asks for a fixed size and records what it was asked."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size, self.calls = size, []

    def __call__(self, w: int, h: int) -> tuple[int, int]:
        self.calls.append((w, h))
        return self.size


@pytest.mark.parametrize(
    ("wanted", "decoded"),
    [((100, 100), (200, 150)), ((200, 150), (200, 150)), ((201, 150), (400, 300)), ((400, 300), (400, 300)),
     ((401, 300), (800, 600)), ((800, 600), (800, 600)), ((801, 10), (1600, 1200)), ((1600, 1200), (1600, 1200))],
)
def test_draft_decodes_a_large_jpeg_smaller_never_below_the_size_asked(
    wanted: tuple[int, int], decoded: tuple[int, int]
) -> None:
    data = encode(smooth(1600, 1200), "JPEG", quality=92)
    draft = Recorder(wanted)
    out = ok_draft(data, draft)
    assert draft.calls == [(1600, 1200)]  # asked once, with the header's size
    assert out.size == decoded  # the smallest of 1/1, 1/2, 1/4, 1/8 that is not below `wanted` on either side
    assert out.size[0] >= wanted[0] and out.size[1] >= wanted[1]
    full = ok(data)
    # What the scaled decode gives is the image, smaller: not another picture or a crop.
    diff = np.abs(np.asarray(full.resize(out.size, Image.Resampling.BOX), dtype=int) - np.asarray(out, dtype=int))
    assert diff.mean() < 2.0, diff.mean()


def test_draft_rounds_odd_sizes_up() -> None:
    out = ok_draft(encode(smooth(1001, 999), "JPEG"), Recorder((120, 120)))
    assert out.size == (126, 125)  # ceil(1001 / 8), ceil(999 / 8)


def ok_draft(data: bytes, draft: object) -> Image.Image:
    out = decode_image(data, BIG, 1, draft)
    assert isinstance(out, Image.Image), out
    assert out.mode == "RGB"
    return out


@pytest.mark.parametrize(("fmt", "kw"), [("PNG", {}), ("WEBP", {"quality": 90}), ("WEBP", {"lossless": True}),
                                         ("GIF", {}), ("TIFF", {})])
def test_draft_is_ignored_by_other_formats(fmt: str, kw: dict) -> None:
    data = encode(smooth(800, 600), fmt, **kw)
    out = ok_draft(data, Recorder((100, 75)))
    assert out.size == (800, 600)
    assert out.tobytes() == ok(data).tobytes()


def test_draft_margin_1_and_2_with_a_real_processor_size() -> None:
    """draft_target with the tiny LLaVA's processor (pad to square, long side to 336): the decoded
    image is at least margin x the processor's output, and smaller than the stored one."""
    from pipeline.config import ModelConfig
    from pipeline.io.images import draft_target
    from pipeline.models import load_adapter

    input_size = load_adapter(ModelConfig(path="tiny:llava-shapes", device="cpu"), "image").input_size
    data = encode(smooth(3000, 2000), "JPEG")
    assert input_size(3000, 2000) == (336, 224)
    sizes = {}
    for margin in (1.0, 2.0, 1.5):
        out = ok_draft(data, draft_target(input_size, margin))
        assert out.size[0] >= margin * 336 and out.size[1] >= margin * 224, (margin, out.size)
        sizes[margin] = out.size
    assert sizes == {1.0: (375, 250), 2.0: (750, 500), 1.5: (750, 500)}  # 1/8, 1/4, 1/4
    assert ok_draft(data, draft_target(input_size, 16.0)).size == (3000, 2000)  # nothing to gain: full decode


@pytest.mark.parametrize(
    ("wanted", "message"),
    [
        ((BIG, 1), "image too large"),  # checked against the header's size, before the draft
        ((1, 1300), "image too small"),
    ],
)
def test_header_errors_are_the_same_with_draft(wanted: tuple[int, int], message: str) -> None:
    data = encode(smooth(1600, 1200), "JPEG")
    max_pixels, min_side = (1_000_000, 1) if message == "image too large" else (BIG, 1300)
    plain = decode_image(data, max_pixels, min_side)
    drafted = decode_image(data, max_pixels, min_side, Recorder((100, 100)))
    assert isinstance(plain, str) and plain.startswith(message)
    assert drafted == plain
    # The reduced size never reaches the checks: an image the draft would shrink below min_side passes.
    assert ok_draft(data, Recorder((100, 100))).size == (200, 150)
    assert isinstance(decode_image(data, BIG, 1200, Recorder((100, 100))), Image.Image)


def _broken_inputs() -> list[object]:
    jpeg = encode(noise(1600, 1200), "JPEG", quality=90)
    progressive = encode(noise(1600, 1200), "JPEG", quality=90, progressive=True)
    return [
        None, b"", bytearray(), 7,
        np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        jpeg[: len(jpeg) // 2], jpeg[:2000], jpeg[:300], jpeg[: len(jpeg) - 100],
        progressive[: len(progressive) // 2],
        b"\xff\xd8\xff garbage",
    ]


def _no_address(error: str) -> str:
    # PIL names the BytesIO object in "cannot identify image file <_io.BytesIO object at 0x...>":
    # its address differs between any two calls, draft or not.
    return re.sub(r" at 0x[0-9a-f]+>", " at 0x...>", error)


def test_broken_and_missing_inputs_give_the_same_error_with_draft() -> None:
    for data in _broken_inputs():
        plain = decode_image(data, BIG, 1)
        assert isinstance(plain, str), plain
        assert _no_address(decode_image(data, BIG, 1, Recorder((100, 100)))) == _no_address(plain)


@pytest.mark.parametrize("side", [12, 20])
def test_pil_bomb_limit_is_the_same_with_draft(monkeypatch: pytest.MonkeyPatch, side: int) -> None:
    data = encode(noise(side, side), "JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = decode_image(data, BIG, 1)
        assert isinstance(plain, str) and plain.startswith("image too large: PIL: ")
        assert decode_image(data, BIG, 1, Recorder((1, 1))) == plain


def _rotated_jpeg(orientation: int) -> tuple[bytes, Image.Image]:
    """A viewer-frame 3600 x 1200 scene stored rotated with EXIF orientation 6 or 8 (as a camera
    held upright writes it): the viewer image has a red block at its top left."""
    viewer = smooth(3600, 1200, seed=orientation)
    viewer.paste((255, 0, 0), (0, 0, 400, 400))
    # exif_transpose applies ROTATE_270 for 6 and ROTATE_90 for 8: store the inverse.
    stored = viewer.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=92, exif=exif), viewer


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_jpeg_with_draft_is_in_viewer_orientation_and_large_enough(orientation: int) -> None:
    from pipeline.config import ModelConfig
    from pipeline.io.images import draft_target
    from pipeline.models import load_adapter

    data, viewer = _rotated_jpeg(orientation)
    assert Image.open(io.BytesIO(data)).size == (1200, 3600)  # stored upright-rotated
    for path in ("tiny:llava-shapes",):
        input_size = load_adapter(ModelConfig(path=path, device="cpu"), "image").input_size
        in_w, in_h = input_size(3600, 1200)  # what the processor makes of the image as shown
        assert (in_w, in_h) == (336, 112)
        for margin in (1.0, 2.0):
            out = ok_draft(data, draft_target(input_size, margin))
            assert out.size[0] > out.size[1]  # viewer orientation
            assert out.size[0] >= margin * in_w and out.size[1] >= margin * in_h, (margin, out.size)
            assert out.size[0] < 3600  # the draft was taken
            assert close(out.getpixel((5, 5)), (255, 0, 0), tol=40)  # the red block is top left, as shown
            assert not close(out.getpixel((out.size[0] - 5, 5)), (255, 0, 0), tol=40)
    assert ok(data).size == viewer.size


def test_exif_target_covers_both_orientations() -> None:
    """draft_target asks for margin x the processor's size of the stored frame AND of the rotated
    frame, so an orientation tag can never leave the viewer image short on one side, even for a
    processor whose output is not the transpose of itself (here: always 100 x 600)."""
    from pipeline.io.images import draft_target

    target = draft_target(lambda w, h: (100, 600), 2.0)
    assert target(4800, 4800) == (1200, 1200)  # either side may end up the width
    data, _ = _rotated_jpeg(6)  # stored 1200 x 3600, shown 3600 x 1200
    out = ok_draft(data, target)
    assert out.size[0] >= 200 and out.size[1] >= 1200, out.size
    # Asking for the stored frame's margin x output alone would decode at 1/2 and come out 600 tall.
    assert ok_draft(data, Recorder((200, 1200))).size == (1800, 600)


def test_cmyk_jpeg_with_draft_converts() -> None:
    img = Image.new("CMYK", (1600, 1200), (255, 0, 0, 0))
    data = encode(img, "JPEG")
    out = ok_draft(data, Recorder((200, 150)))
    assert out.size == (200, 150)
    assert close(out.getpixel((100, 75)), (0, 255, 255), tol=3)
    assert close(out.getpixel((100, 75)), ok(data).getpixel((800, 600)), tol=2)


def test_greyscale_jpeg_with_draft_converts() -> None:
    img = smooth(1600, 1200).convert("L")
    data = encode(img, "JPEG")
    assert Image.open(io.BytesIO(data)).mode == "L"
    out = ok_draft(data, Recorder((400, 300)))
    assert out.size == (400, 300)
    arr = np.asarray(out, dtype=int)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()  # grey, as convert("RGB")
    ref = np.asarray(ok(data).resize((400, 300), Image.Resampling.BOX).convert("L"), dtype=int)
    assert np.abs(arr[..., 0] - ref).mean() < 2.0


def test_draft_applies_to_mpo_camera_jpegs() -> None:
    """Many phone photos carry a multi-picture block (a depth map, a preview): PIL opens them as
    MPO, whose first frame is the JPEG itself; the draft must engage there too."""
    first = smooth(1600, 1200)
    data = encode(first, "MPO", save_all=True, append_images=[Image.new("RGB", (160, 120), (0, 0, 200))])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = ok_draft(data, Recorder((200, 150)))
    assert out.size == (200, 150)
    full = ok(data)
    assert full.size == (1600, 1200)  # frame 0, not the small picture
    diff = np.abs(np.asarray(full.resize((200, 150), Image.Resampling.BOX), dtype=int) - np.asarray(out, dtype=int))
    assert diff.mean() < 2.0
