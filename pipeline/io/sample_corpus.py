"""Synthetic sample corpus: coloured shapes with VQA-style prompts and their true answers.

Input schema (what the job reads; extra columns pass through to the output):

| column  | type   | meaning                                          |
|---------|--------|--------------------------------------------------|
| id      | string | unique row id                                    |
| image   | binary | encoded image bytes (JPEG, PNG or WebP)          |
| prompt  | string | the question or instruction for this image       |

The sample corpus adds ``expected`` (string), the true answer, for checking a real model.

    python -m pipeline.io.sample_corpus OUT_DIR [--rows 48] [--shards 2] [--corrupt 1]
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 205, 30), "purple": (140, 50, 170)}
SHAPES = ("circle", "square", "triangle")
FORMATS = ("JPEG", "PNG", "WEBP")
SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("prompt", pa.string()), ("expected", pa.string())])


def _draw(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, list[tuple[str, str]]]:
    img = Image.new("RGB", size, (245, 245, 240))
    draw = ImageDraw.Draw(img)
    objects = []
    w, h = size
    for _ in range(rng.randint(1, 3)):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        r = rng.randint(min(w, h) // 10, min(w, h) // 5)
        cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
        objects.append((colour, shape))
    return img, objects


def _question(rng: random.Random, objects: list[tuple[str, str]]) -> tuple[str, str]:
    colour, shape = rng.choice(objects)
    kind = rng.randrange(3)
    if kind == 0:
        return f"What color is the {shape}?\nAnswer the question using a single word or phrase.", colour
    if kind == 1:
        ask_colour = rng.choice(list(COLOURS))
        present = (ask_colour, shape) in objects
        return f"Is there a {ask_colour} {shape} in the image? Please answer yes or no.", "yes" if present else "no"
    return "How many shapes are in the picture?\nAnswer the question using a single word or phrase.", str(len(objects))


def make_rows(n: int, seed: int = 0, corrupt: int = 0) -> list[dict[str, object]]:
    """``n`` rows; the last ``corrupt`` of them carry undecodable image bytes."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        img, objects = _draw(rng, (rng.choice([320, 400, 480]), rng.choice([240, 300, 360])))
        prompt, expected = _question(rng, objects)
        buf = io.BytesIO()
        img.save(buf, format=FORMATS[i % len(FORMATS)])
        data = buf.getvalue()
        if i >= n - corrupt:
            data = b"\x89PNG\r\n\x1a\n" + b"not really an image" * 8
        rows.append({"id": f"sample-{i:05d}", "image": data, "prompt": prompt, "expected": expected})
    return rows


def write_corpus(out_dir: str | Path, rows: int = 48, shards: int = 2, seed: int = 0, corrupt: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = make_rows(rows, seed=seed, corrupt=corrupt)
    per = -(-len(data) // shards)
    for s in range(shards):
        chunk = data[s * per : (s + 1) * per]
        if chunk:
            pq.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA), out / f"part-{s:05d}.parquet")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="Write the synthetic sample corpus as Parquet shards")
    p.add_argument("out_dir")
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corrupt", type=int, default=0, help="make the last N rows undecodable")
    a = p.parse_args()
    print(write_corpus(a.out_dir, a.rows, a.shards, a.seed, a.corrupt))


if __name__ == "__main__":
    main()
