"""Image bytes -> one 8-bit RGB image, or the reason the row cannot use it.

decode_image(data, max_pixels, min_side, draft) returns a fully loaded RGB PIL image or "<kind>: <detail>".
The contract, one rule a line:
    None, a non-bytes value or 0 bytes -> "missing image: null" / "...: not bytes (<type>)" / "...: 0 bytes"
    bytes, bytearray, memoryview and numpy byte strings (np.bytes_) are all accepted as bytes
    bytes PIL cannot identify, or a truncated file -> "corrupt image: <ExceptionType>: <message, cut to 200 chars>"
    width*height from the header > max_pixels -> "image too large: WxH = N pixels > input.max_image_pixels = M"
        (decided from the header, before any pixel data is decoded)
    PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS) hit first -> "image too large: PIL: <message>"
    either side < min_side -> "image too small: WxH < input.min_image_side = S"
    animated images (GIF, WebP, APNG) -> the first frame
    draft(w, h) given and a JPEG (or an MPO: a camera JPEG carrying extra pictures): decoded at the smallest
        DCT scale (1/2, 1/4, 1/8) that leaves each side at least the size draft returns for the header's size
        (``PIL.Image.draft``; the checks above use the header, so no error changes), then EXIF-rotated as
        below; other formats ignore it
    EXIF orientation is applied (the image as a viewer shows it); a broken EXIF block is ignored
    RGB -> as is
    L, 1, CMYK, YCbCr, LAB, HSV, P without transparency -> PIL's convert("RGB")
    RGBA, LA, PA, RGBa, and P / L / RGB with a "transparency" entry -> composited onto white
    I;16, I;16B, I;16L, I;16N, I (clipped to 0..65535) -> grey, round(value * 255 / 65535)
    F -> grey, clipped to [0, 1] when its max is <= 1 (else [0, 255]) and scaled to 0..255
    any other mode -> PIL's convert("RGB"), or "unsupported image mode: <mode>" when PIL cannot
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

IMAGE_ERROR_KINDS: tuple[str, ...] = (
    "missing image",
    "corrupt image",
    "image too large",
    "image too small",
    "unsupported image mode",
)

_MAX_DETAIL = 200
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_INT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def _as_bytes(data: object) -> bytes | str:
    if data is None:
        return "missing image: null"
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, (bytes, bytearray)):  # np.bytes_ is a bytes subclass
        return f"missing image: not bytes ({type(data).__name__})"
    if not data:
        return "missing image: 0 bytes"
    return bytes(data)


def _grey(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint(arr).astype(np.uint8), "L").convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image | str:
    mode = img.mode
    if mode in _INT_MODES:
        # PIL's convert("L") clips I;16 values above 255 to white; scale the full 16-bit range instead.
        v = np.clip(np.asarray(img).astype(np.float64), 0, 65535)
        return _grey(v * 255 / 65535)
    if mode == "F":
        v = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = 1.0 if v.size and v.max() <= 1 else 255.0
        return _grey(np.clip(v, 0, top) * (255 / top))
    try:
        if mode in _ALPHA_MODES or "transparency" in img.info:
            # convert("RGB") would drop alpha and expose whatever colour is stored under transparent
            # pixels (often black); a viewer shows them over a light page, so composite onto white.
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img if mode == "RGB" else img.convert("RGB")
    except ValueError:
        return f"unsupported image mode: {mode}"


def decode_image(
    data: object, max_pixels: int, min_side: int, draft: Callable[[int, int], tuple[int, int]] | None = None,
) -> Image.Image | str:
    """A fully loaded 8-bit RGB image, or "<kind>: <detail>" (becomes the row's error). ``draft``:
    (width, height) of the stored image -> the smallest (width, height) worth decoding (see
    ``draft_target``); None decodes every pixel."""
    data = _as_bytes(data)
    if isinstance(data, str):
        return data
    try:
        # PIL warns (above Image.MAX_IMAGE_PIXELS) or raises (above twice that) on huge headers; turn the
        # warning into an error locally rather than touching the global limit.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # frame 0 of an animated image
            w, h = img.size  # from the header, before any pixels are decoded
            if w * h > max_pixels:
                return f"image too large: {w}x{h} = {w * h} pixels > input.max_image_pixels = {max_pixels}"
            if min(w, h) < min_side:
                return f"image too small: {w}x{h} < input.min_image_side = {min_side}"
            # MPO: JPEG frame 0 plus a multi-picture block (many phone photos): the same decoder.
            if draft is not None and img.format in ("JPEG", "MPO"):
                img.draft(None, draft(w, h))  # the mode stays; the DCT scale is picked before any pixel is decoded
            img.load()  # truncated or broken pixel data raises here, not later in the encoder
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"image too large: PIL: {e}"[:_MAX_DETAIL]
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        return f"corrupt image: {type(e).__name__}: {str(e)[:_MAX_DETAIL]}"
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001, S110 - a broken EXIF block only loses the rotation
        pass
    return _to_rgb(img)


def draft_target(
    input_size: Callable[[int, int], tuple[int, int]], margin: float
) -> Callable[[int, int], tuple[int, int]]:
    """``decode_image``'s ``draft``: a stored ``w`` x ``h`` image may be decoded down to ``margin``
    times the size the model's processor resizes it to (``input_size``), taken for both
    orientations (an EXIF rotation swaps the sides after decoding), so the processor's own
    resize always starts from at least ``margin`` x its output (PIL's ``thumbnail`` uses 2)."""

    def target(w: int, h: int) -> tuple[int, int]:
        a_w, a_h = input_size(w, h)
        b_h, b_w = input_size(h, w)  # rotated: the processor sees h x w; its output's sides swap back
        return min(w, math.ceil(margin * max(a_w, b_w))), min(h, math.ceil(margin * max(a_h, b_h)))

    return target
