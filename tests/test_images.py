from __future__ import annotations

import io
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
