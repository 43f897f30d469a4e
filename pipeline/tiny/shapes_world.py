"""The shapes world: synthetic images of coloured shapes with VQA questions and true answers.

Used for the demo corpus, the held-out evaluation corpora and the training of ``tiny:llava-shapes``.
The world is a contract (other corpora are drawn from it):

- a plain light background of any shade; images of any size and aspect ratio, 200 to 800 px a side;
- 1 to 4 non-overlapping objects, each a circle, square or triangle, coloured red, green, blue,
  yellow or purple (shades jittered), anywhere in the image, of varied sizes: a radius (half the
  side) drawn uniformly from 4 % to 20 % of the image's long side (``SIZE_RANGE``; about 2 to 10
  patches across after LLaVA's pad-to-square resize to 24 x 24 patches), capped at 45 % of the
  short side;
- five question types, verbatim templates; four answered by one bare lower-case word, and a
  caption:

  | type       | template                                                                   | answer       |
  |------------|----------------------------------------------------------------------------|--------------|
  | `color`    | What color is the {shape}?\\nAnswer the question using a single word or phrase. | the colour (asked only when that shape occurs once) |
  | `presence` | Is there a {colour} {shape} in the image? Please answer yes or no.           | yes / no (half absent) |
  | `count`    | How many shapes are in the picture?\\nAnswer the question using a single word or phrase. | 1 .. 4 |
  | `position` | Is the {colour} {shape} on the left or on the right?\\nAnswer the question using a single word or phrase. | left / right (asked only when that object occurs once and its centre is clearly off the middle) |
  | `caption`  | Describe the image.                                                        | every object left to right by its centre, ``a {colour} {shape}``, joined by ", " and a final " and ", ending with "." (``caption_text``) |

The caption lists objects left to right (ties: top to bottom), e.g. ``a red circle, a blue square
and a yellow triangle.``; one object: ``a green triangle.`` Scoring parses the objects back out
(``pipeline.tiny.scoring.caption_objects``).

Input schema (what the job reads; extra columns pass through to the output):

| column          | type   | meaning                                            |
|-----------------|--------|----------------------------------------------------|
| id              | string | unique row id                                      |
| image           | binary | encoded image bytes (JPEG, PNG or WebP)            |
| prompt          | string | the question or instruction for this image         |

Sample corpora add ``expected`` (the true answer) and ``question_type`` (one of the types above),
and for annotation tasks ``shape`` and ``expected_objects`` (``task_labels``),
which the job summary and the evaluation job (``jobs/evaluate_pruning.py``) score against; captions
are scored by objects only where these labels are present (``pipeline.tiny.scoring``).

    python -m pipeline.tiny.shapes_world OUT_DIR [--rows 48] [--shards 2] [--seed 0] [--corrupt 1] [--types color,...,caption]
        [--format parquet|files|webdataset|parquet-refs]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = {"red": (215, 35, 35), "green": (35, 165, 60), "blue": (40, 70, 215), "yellow": (235, 205, 35), "purple": (135, 50, 170)}
SHAPES = ("circle", "square", "triangle")
QUESTION_TYPES = ("color", "presence", "count", "position", "caption")
SHORT_TYPES = QUESTION_TYPES[:4]  # answered by one word, scored by exact match
DEFAULT_TYPES = QUESTION_TYPES  # what sample corpora draw unless told otherwise (`--types`)
FORMATS = ("JPEG", "PNG", "WEBP")
SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.binary()), ("prompt", pa.string()),
    ("expected", pa.string()), ("question_type", pa.string()),
    ("shape", pa.string()), ("expected_objects", pa.string()),
])
MIN_SIDE, MAX_SIDE = 200, 800
SINGLE_WORD = "\nAnswer the question using a single word or phrase."
CAPTION_PROMPT = "Describe the image."
SIZE_RANGE = (0.04, 0.2)  # object radius as a share of the image's long side
COLOUR_JITTER = 25  # per channel, uniform
MIDDLE_MARGIN = 0.1  # `position` is asked only when |centre x - middle| > this share of the width


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    cx: float  # centre, pixels
    cy: float
    r: float  # half the side / radius, pixels

    def outline(self) -> list[tuple[float, float]] | tuple[float, float, float, float]:
        """Polygon vertices (triangle) or bounding box (circle, square)."""
        if self.shape == "triangle":  # pointing up, filling the bounding box (as large as the square)
            return [(self.cx, self.cy - self.r), (self.cx - self.r, self.cy + self.r), (self.cx + self.r, self.cy + self.r)]
        return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)


@dataclass(frozen=True)
class Scene:
    size: tuple[int, int]  # width, height
    background: tuple[int, int, int]
    objects: tuple[Shape, ...]
    fills: tuple[tuple[int, int, int], ...]  # each object's jittered RGB

    def render(self) -> Image.Image:
        img = Image.new("RGB", self.size, self.background)
        draw = ImageDraw.Draw(img)
        for obj, fill in zip(self.objects, self.fills, strict=True):
            paint(draw, obj, fill)
        return img

    def label_map(self) -> Image.Image:
        """Mode-L image: 0 background, k for pixels of object k (1-based). For training targets."""
        img = Image.new("L", self.size, 0)
        draw = ImageDraw.Draw(img)
        for k, obj in enumerate(self.objects, start=1):
            paint(draw, obj, k)
        return img


def paint(draw: ImageDraw.ImageDraw, obj: Shape, fill: object) -> None:
    if obj.shape == "circle":
        draw.ellipse(obj.outline(), fill=fill)
    elif obj.shape == "square":
        draw.rectangle(obj.outline(), fill=fill)
    else:
        draw.polygon(obj.outline(), fill=fill)


def draw_scene(rng: random.Random, size: tuple[int, int] | None = None, n_objects: int | None = None) -> Scene:
    """A random scene of the world. Objects are placed by bounded rejection sampling: a scene
    that cannot fit ``n_objects`` after the tries keeps the ones that fit (at least one)."""
    w, h = size or (rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE))
    n = n_objects or rng.randint(1, 4)
    long_side, short_side = max(w, h), min(w, h)
    background = tuple(rng.randint(195, 255) for _ in range(3))
    objects: list[Shape] = []
    for _ in range(200):  # bounded tries
        if len(objects) == n:
            break
        # Sizes relative to the long side: after padding to square and resizing to the encoder's
        # 24 x 24 patch grid an object spans about 2 to 10 patches across, whatever the aspect ratio.
        r = min(rng.uniform(*SIZE_RANGE) * long_side, 0.45 * short_side)
        cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
        if all(math.hypot(cx - o.cx, cy - o.cy) > r + o.r + 0.02 * long_side for o in objects):
            objects.append(Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), cx, cy, r))
    fills = tuple(
        tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[o.colour]) for o in objects
    )
    return Scene((w, h), background, tuple(objects), fills)


def caption_text(scene: Scene) -> str:
    """The caption contract: objects left to right by centre (ties top to bottom), ``a {colour}
    {shape}``, joined by ", " and a final " and ", ending with a full stop."""
    names = [f"a {o.colour} {o.shape}" for o in sorted(scene.objects, key=lambda o: (o.cx, o.cy))]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return listed + "."


def askable(scene: Scene) -> dict[str, list[tuple[str, str]]]:
    """Per question type, the (prompt, answer) pairs this scene supports."""
    shapes = [o.shape for o in scene.objects]
    pairs = [(o.colour, o.shape) for o in scene.objects]
    w = scene.size[0]
    out: dict[str, list[tuple[str, str]]] = {t: [] for t in QUESTION_TYPES}
    for o in scene.objects:
        if shapes.count(o.shape) == 1:
            out["color"].append((f"What color is the {o.shape}?{SINGLE_WORD}", o.colour))
        if pairs.count((o.colour, o.shape)) == 1 and abs(o.cx - w / 2) > MIDDLE_MARGIN * w:
            side = "left" if o.cx < w / 2 else "right"
            out["position"].append((f"Is the {o.colour} {o.shape} on the left or on the right?{SINGLE_WORD}", side))
    present = sorted(set(pairs))
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in pairs]
    out["presence"] = [(f"Is there a {c} {s} in the image? Please answer yes or no.", "yes") for c, s in present]
    out["presence_absent"] = [(f"Is there a {c} {s} in the image? Please answer yes or no.", "no") for c, s in absent]
    out["count"] = [(f"How many shapes are in the picture?{SINGLE_WORD}", str(len(scene.objects)))]
    out["caption"] = [(CAPTION_PROMPT, caption_text(scene))]
    return out


def ask(rng: random.Random, scene: Scene, question_type: str | None = None,
        types: tuple[str, ...] = DEFAULT_TYPES) -> tuple[str, str, str]:
    """(prompt, answer, type): the type uniform among ``types`` the scene supports (or as given,
    falling back to those when the scene cannot ask it)."""
    options = askable(scene)
    types = [t for t in types if options[t] or (t == "presence" and options["presence_absent"])]
    t = question_type if question_type in types else rng.choice(types)
    if t == "presence":  # half of them absent
        pool = options["presence_absent"] if rng.random() < 0.5 or not options["presence"] else options["presence"]
    else:
        pool = options[t]
    prompt, answer = rng.choice(pool)
    return prompt, answer, t


def make_rows(n: int, seed: int = 0, corrupt: int = 0, types: tuple[str, ...] = DEFAULT_TYPES) -> list[dict[str, object]]:
    """``n`` rows drawn from the world with ``seed``, question types uniform among ``types``; the
    last ``corrupt`` carry undecodable bytes."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        scene = draw_scene(rng)
        prompt, expected, qtype = ask(rng, scene, types=types)
        buf = io.BytesIO()
        fmt = FORMATS[i % len(FORMATS)]
        scene.render().save(buf, format=fmt, **({"quality": 95} if fmt != "PNG" else {}))
        data = buf.getvalue()
        if i >= n - corrupt:
            data = b"\x89PNG\r\n\x1a\n" + b"not really an image" * 8
        rows.append({"id": f"sample-{seed}-{i:05d}", "image": data, "prompt": prompt, "expected": expected,
                     "question_type": qtype, **task_labels(scene)})
    return rows


def task_labels(scene: Scene) -> dict[str, str | None]:
    """What an annotation-task run (docs/tasks.md) asks of and scores against: ``shape``, the
    leftmost shape that occurs once (the colour question's subject; null when none does), and
    ``expected_objects``, every object left to right as JSON (``[{"colour": ..., "shape": ...}, ...]``)."""
    ordered = sorted(scene.objects, key=lambda o: (o.cx, o.cy))
    shapes = [o.shape for o in ordered]
    single = next((s for s in shapes if shapes.count(s) == 1), None)
    objects = [{"colour": o.colour, "shape": o.shape} for o in ordered]
    return {"shape": single, "expected_objects": json.dumps(objects, separators=(",", ":"))}


def parse_types(text: str) -> tuple[str, ...]:
    """``"color,caption"`` -> the types, checked against the world's."""
    types = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in types if t not in QUESTION_TYPES]
    if unknown or not types:
        raise ValueError(f"question types must be some of {', '.join(QUESTION_TYPES)}; got {text!r}")
    return types


CORPUS_FORMATS = ("parquet", "files", "webdataset", "parquet-refs")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
REFERENCE_COLUMN = "image_key"  # parquet-refs: each row's image file, relative to <out>/images


def write_corpus(out_dir: str | Path, rows: int = 48, shards: int = 2, seed: int = 0, corrupt: int = 0,
                 types: tuple[str, ...] = DEFAULT_TYPES, fmt: str = "parquet") -> Path:
    """The same rows in one of the job's input formats (docs/inputs.md): ``parquet`` (bytes in the
    rows), ``files`` (``<id>.<ext>``; the other columns are not written), ``webdataset`` (tar
    shards: ``<id>.<ext>``, ``<id>.txt`` the prompt, ``<id>.json`` the other columns) or
    ``parquet-refs`` (``images/<id>.<ext>`` and ``rows/*.parquet`` with the key in ``image_key``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = make_rows(rows, seed=seed, corrupt=corrupt, types=types)
    per = -(-len(data) // shards)
    chunks = [c for c in (data[s * per : (s + 1) * per] for s in range(shards)) if c]
    if fmt == "parquet":
        for s, chunk in enumerate(chunks):
            pq.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA), out / f"part-{s:05d}.parquet")
    elif fmt in ("files", "parquet-refs"):
        images = out / "images" if fmt == "parquet-refs" else out
        images.mkdir(exist_ok=True)
        for row in data:
            (images / image_name(row)).write_bytes(row["image"])
        if fmt == "parquet-refs":
            (out / "rows").mkdir(exist_ok=True)
            schema = pa.schema([(REFERENCE_COLUMN, pa.string()) if f.name == "image" else f for f in SCHEMA])
            for s, chunk in enumerate(chunks):
                refs = [{**r, "image": None, REFERENCE_COLUMN: image_name(r)} for r in chunk]
                pq.write_table(pa.Table.from_pylist(refs, schema=schema), out / "rows" / f"part-{s:05d}.parquet")
    elif fmt == "webdataset":
        for s, chunk in enumerate(chunks):
            with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
                for row in chunk:
                    extra = {k: v for k, v in row.items() if k not in ("id", "image", "prompt")}
                    for name, payload in ((image_name(row), row["image"]), (f"{row['id']}.txt", row["prompt"].encode()),
                                          (f"{row['id']}.json", json.dumps(extra).encode())):
                        member = tarfile.TarInfo(name)
                        member.size = len(payload)
                        tar.addfile(member, io.BytesIO(payload))
    else:
        raise ValueError(f"format {fmt!r}: one of {', '.join(CORPUS_FORMATS)}")
    return out


def image_name(row: dict[str, object]) -> str:
    """``<id>.<ext>`` by the image's own format (the corrupt rows' bytes claim PNG)."""
    data = row["image"]
    ext = "png" if data.startswith(b"\x89PNG") else "jpg" if data.startswith(b"\xff\xd8") else "webp"
    return f"{row['id']}.{ext}"


def main() -> None:
    p = argparse.ArgumentParser(description="Write a corpus of the shapes world in one of the job's input formats")
    p.add_argument("out_dir")
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="world seed (training uses its own; see jobs/train_tiny_vlm.py)")
    p.add_argument("--corrupt", type=int, default=0, help="make the last N rows undecodable")
    p.add_argument("--types", default=",".join(DEFAULT_TYPES),
                   help=f"question types to draw, comma-separated, of {','.join(QUESTION_TYPES)}")
    p.add_argument("--format", default="parquet", choices=CORPUS_FORMATS,
                   help="parquet: bytes in the rows; files: one file per image; webdataset: tar shards; "
                   "parquet-refs: files plus Parquet rows naming them (docs/inputs.md)")
    a = p.parse_args()
    print(write_corpus(a.out_dir, a.rows, a.shards, a.seed, a.corrupt, parse_types(a.types), a.format))


if __name__ == "__main__":
    main()
