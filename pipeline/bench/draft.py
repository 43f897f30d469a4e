"""Benchmark: what fast JPEG decoding (``input.jpeg_draft_margin``, PIL's draft mode) changes.

    python -m pipeline.bench.draft [--scenes 80] [--seed 3100] [--sides 1344:4032] [--margins 2,1]
                                   [--repeats 3] [--config configs/local.yaml] [--no-answers]

Corpus (held out: the demo draws seed 0, the tiny model's held-out sets 77/78, its training
10_000_000 + step): ``--scenes`` scenes of the shapes world (``draw_scene``) rendered LARGE (the
world's own images are 200 to 800 px): every other one at a camera's size (``CAMERA_SIZES``, either
orientation, those within ``--sides``), the rest with each side uniform in ``--sides``; stored as
JPEG at quality 90 to 95 (PIL's 4:2:0 chroma, as cameras write), every eighth one rotated on disk
with an EXIF orientation of 6 or 8 (a camera held upright); one question per scene from the
world's own ``ask`` (all five types, captions included), its true answer beside it.

Processors (pixels only, no weights; ``load_adapter(..., "image")`` as the CPU stage loads them):
``tiny-llava-shapes`` (LLaVA-1.5's pad to square, 336 px: the model whose answers are measured),
``llava-1.5-7b`` and ``llava-v1.6-7b`` (``configs/checkpoints/*``' config.json beside the
image processor the hub ships for it, written here as ``pipeline/bench/gpu.py`` writes LLaVA-1.5's:
CLIP resize + centre crop at 336; LLaVA-NeXT's anyres tiles), ``qwen3-vl-8b``
(``configs/checkpoints/Qwen3-VL-8B-Instruct`` at ``configs/qwen3-vl-8b.yaml``'s ``max_pixels``)
and ``qwen3-vl-8b-448`` (at ``configs/local-qwen3_vl.yaml``'s, 448 x 448 pixels).

Per processor, margin and image: the decoded size (engaged = smaller than the stored image), and
the model-input pixels (``prepare_image`` -> ``PixelLUT`` on the CPU, float32: exactly what the
vision tower receives) of the draft decode against the full one: max and mean absolute
difference and PSNR, in the processor's normalised units and in uint8 levels (peak: the full
range), summarised over the images the draft engaged (the others are identical), and apart for the
sizes the scale divides (camera sizes: no partial pixel at the right and bottom edges); where the
input's shape or the visual-token count (the family's ``token_counts``) differs, that is counted
instead. The yardstick beside them: the full decode's own distance from the scene as drawn (the
JPEG's loss at the model input). Timing, alternating full and draft per image (``--repeats``,
medians): ``decode_image`` ms, then ``prepare_image`` ms once each; the speed-up is of their sum.

Answers (``tiny:llava-shapes``; ``--no-answers`` skips them): the job's stages called in this
process without Ray, in batches of the config's sizes (text -> prepare with each margin and with
null -> encode: ResPrune at the config's keep, 128 -> decode: HF greedy), the same batches for
every variant; short-answer accuracy and caption object F1 (``pipeline.quality.scoring``),
answers and kept-token sets that differ from the full decode's, each differing answer printed.

The last line is ``RESULT {json}``: ``<processor>_m<margin>_<figure>`` keys (e.g.
``tiny-llava-shapes_m2_mean_abs_levels``), ``answers_m<margin>_differ``, ``accuracy_full``,
``accuracy_m<margin>``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from pipeline.config import ModelConfig, load_config
from pipeline.io.images import decode_image, draft_target
from pipeline.models import ADAPTERS, VisionLanguageAdapter, load_adapter
from pipeline.models.base import PixelLUT
from pipeline.tiny.shapes_world import ask, draw_scene

REPO = Path(__file__).resolve().parents[2]
SEED = 3100
SIDES = (1344, 4032)
MARGINS = (2.0, 1.0)
CLIP = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
            image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
CAMERA_SIZES = [(4032, 3024), (4000, 3000), (3840, 2160), (3264, 2448), (2592, 1944), (2048, 1536), (1920, 1440)]
ORIENTATIONS = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}  # stored = the inverse of exif_transpose's


def large_rows(n: int, seed: int = SEED, sides: tuple[int, int] = SIDES) -> list[dict[str, Any]]:
    """``n`` held-out rows of the shapes world as camera-sized JPEGs (module docstring)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        size = (rng.randint(*sides), rng.randint(*sides))
        cameras = [c for c in CAMERA_SIZES if sides[0] <= min(c) and max(c) <= sides[1]]
        if i % 2 and cameras:  # every other one a camera's size (multiples of 8: draft scales divide them)
            size = rng.choice(cameras)
            size = size if rng.random() < 0.5 else size[::-1]
        scene = draw_scene(rng, size=size)
        prompt, expected, qtype = ask(rng, scene)
        quality = rng.randint(90, 95)
        image, exif = scene.render(), None
        if i % 8 == 7:
            orientation = 6 if i % 16 == 7 else 8
            image = image.transpose(ORIENTATIONS[orientation])
            exif = Image.Exif()
            exif[0x0112] = orientation
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality, **({"exif": exif} if exif is not None else {}))
        rows.append({"id": f"draft-{seed}-{i:03d}", "image": buf.getvalue(), "prompt": prompt, "expected": expected,
                     "question_type": qtype, "scene": scene, "quality": quality})
    return rows


@dataclass(frozen=True)
class Processor:
    name: str
    adapter: VisionLanguageAdapter
    path: str  # the resolved checkpoint directory (token_counts reads its config)
    cfg: ModelConfig


def _hub_processor_dir(root: Path, checkpoint: str) -> str:
    """``configs/checkpoints/<checkpoint>``'s config.json beside the image processor its hub
    repository ships (CLIP's at 336; LLaVA-NeXT's adds the config's grid pinpoints)."""
    from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil

    out = root / checkpoint
    out.mkdir(parents=True)
    shutil.copy(REPO / "configs/checkpoints" / checkpoint / "config.json", out)
    config = json.loads((out / "config.json").read_text())
    if "image_grid_pinpoints" in config:
        LlavaNextImageProcessorPil(image_grid_pinpoints=config["image_grid_pinpoints"], **CLIP).save_pretrained(out)
    else:
        CLIPImageProcessorPil(**CLIP).save_pretrained(out)
    return str(out)


def _max_pixels(config: str) -> int:
    return int(yaml.safe_load((REPO / config).read_text())["model"]["max_pixels"])


def processors(root: Path) -> list[Processor]:
    qwen3 = str(REPO / "configs/checkpoints/Qwen3-VL-8B-Instruct")
    specs = [
        ("tiny-llava-shapes", ModelConfig(path="tiny:llava-shapes", device="cpu")),
        ("llava-1.5-7b", ModelConfig(path=_hub_processor_dir(root, "llava-1.5-7b-hf"), device="cpu")),
        ("llava-v1.6-7b", ModelConfig(path=_hub_processor_dir(root, "llava-v1.6-vicuna-7b-hf"), device="cpu")),
        ("qwen3-vl-8b", ModelConfig(path=qwen3, device="cpu", max_pixels=_max_pixels("configs/qwen3-vl-8b.yaml"))),
        ("qwen3-vl-8b-448",
         ModelConfig(path=qwen3, device="cpu", max_pixels=_max_pixels("configs/local-qwen3_vl.yaml"))),
    ]
    out = []
    for name, cfg in specs:
        adapter = load_adapter(cfg, "image")
        out.append(Processor(name, adapter, adapter.path, cfg))
    return out


def pixel_stats(full: np.ndarray, draft: np.ndarray, lut: PixelLUT) -> dict[str, float | None]:
    """Draft against full model-input pixels (uint8 [..., 3, H, W], same shape): in uint8 levels
    and in the processor's normalised units (``lut``: its rescale + normalise); PSNR's peak is the
    full range of each unit (255 levels; the widest channel's normalised range); None: identical."""
    diff_levels = np.abs(full.astype(np.float64) - draft.astype(np.float64))
    a, b = (lut(x, torch.float32).double().numpy() for x in (full, draft))
    diff_norm = np.abs(a - b)
    table = lut.table.double()
    peak_norm = float((table[:, 255] - table[:, 0]).abs().max())

    def psnr(diff: np.ndarray, peak: float) -> float | None:
        mse = float(np.mean(diff**2))
        return None if mse == 0 else 10 * math.log10(peak**2 / mse)

    return {"max_abs_levels": float(diff_levels.max()), "mean_abs_levels": float(diff_levels.mean()),
            "psnr_db": psnr(diff_levels, 255.0), "max_abs_norm": float(diff_norm.max()),
            "mean_abs_norm": float(diff_norm.mean()), "psnr_norm_db": psnr(diff_norm, peak_norm)}


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, 1e3 * (time.perf_counter() - start)


def _decode(data: bytes, draft: Any) -> Image.Image:
    out = decode_image(data, 10**9, 1, draft)
    if isinstance(out, str):
        raise RuntimeError(out)
    return out


def compare_pixels(rows: list[dict[str, Any]], procs: list[Processor], margins: tuple[float, ...],
                   repeats: int) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Per (processor, margin), one record per image (module docstring)."""
    luts = {p.name: PixelLUT(p.adapter.image_processor, torch.device("cpu")) for p in procs}
    drafts = {(p.name, m): draft_target(p.adapter.input_size, m) for p in procs for m in margins}
    records: dict[tuple[str, float], list[dict[str, Any]]] = {key: [] for key in drafts}
    for n, row in enumerate(rows):
        data = row["image"]
        # Decode times, full and every draft alternately (after one untimed pass, and in a rotated
        # order each repeat), so that caches and load from elsewhere hit all alike.
        keys: list[Any] = [None, *drafts]
        times: dict[Any, list[float]] = {key: [] for key in keys}
        for rep in range(repeats + 1):
            for key in keys[rep % len(keys):] + keys[: rep % len(keys)]:
                _, ms = _timed(lambda key=key: _decode(data, drafts[key] if key else None))
                if rep:
                    times[key].append(ms)
        full = _decode(data, None)
        lossless = row["scene"].render()  # the scene as drawn, before JPEG: the yardstick
        for p in procs:
            ref, ref_ms = _timed(lambda p=p: p.adapter.prepare_image(full))
            truth = p.adapter.prepare_image(lossless)["pixels"]
            ref_tokens = p.adapter.token_counts(p.path, p.cfg, *full.size)[0]
            jpeg = (pixel_stats(np.asarray(truth), np.asarray(ref["pixels"]), luts[p.name])
                    if truth.shape == ref["pixels"].shape else {})
            for m in margins:
                image = _decode(data, drafts[(p.name, m)])
                prepared, ms = _timed(lambda p=p, image=image: p.adapter.prepare_image(image))
                record: dict[str, Any] = {
                    "id": row["id"], "stored": Image.open(io.BytesIO(data)).size, "decoded": image.size,
                    "engaged": image.size != full.size, "scale": round(full.size[0] / image.size[0]),
                    "decode_ms_full": statistics.median(times[None]),
                    "decode_ms_draft": statistics.median(times[(p.name, m)]),
                    "prepare_ms_full": ref_ms, "prepare_ms_draft": ms,
                    "tokens_full": ref_tokens, "tokens_draft": p.adapter.token_counts(p.path, p.cfg, *image.size)[0],
                    # LLaVA-NeXT's other key, the image's size, is the decoded size: it changes by design.
                    "same_shape": prepared["pixels"].shape == ref["pixels"].shape,
                    "jpeg": jpeg,
                }
                if record["same_shape"]:
                    record |= pixel_stats(np.asarray(ref["pixels"]), np.asarray(prepared["pixels"]), luts[p.name])
                    if truth.shape == prepared["pixels"].shape:
                        record["lossless"] = pixel_stats(np.asarray(truth), np.asarray(prepared["pixels"]),
                                                         luts[p.name])
                records[(p.name, m)].append(record)
        print(f"  pixels: {n + 1}/{len(rows)} {row['id']} {full.size}", flush=True)
    return records


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


def summarise_pixels(records: list[dict[str, Any]]) -> dict[str, Any]:
    # Pixel figures over the images the draft changed (the others are identical by construction).
    same = [r for r in records if r["same_shape"] and r["engaged"]]
    psnrs = [r["psnr_db"] for r in same if r["psnr_db"] is not None]
    aligned = [r for r in same if all(side % r["scale"] == 0 for side in r["stored"])]

    def total(key: str) -> float:
        return sum(r[key] for r in records)

    full_ms, draft_ms = total("decode_ms_full") + total("prepare_ms_full"), total("decode_ms_draft") + total(
        "prepare_ms_draft")
    return {
        "images": len(records), "engaged": sum(r["engaged"] for r in records),
        "scales": {str(s): sum(r["scale"] == s for r in records) for s in sorted({r["scale"] for r in records})},
        "shape_changed": sum(not r["same_shape"] for r in records),
        "tokens_changed": sum(r["tokens_full"] != r["tokens_draft"] for r in records),
        "max_abs_levels": max((r["max_abs_levels"] for r in same), default=None),
        "mean_abs_levels": statistics.mean(r["mean_abs_levels"] for r in same) if same else None,
        "worst_mean_abs_levels": max((r["mean_abs_levels"] for r in same), default=None),
        "max_abs_norm": max((r["max_abs_norm"] for r in same), default=None),
        "mean_abs_norm": statistics.mean(r["mean_abs_norm"] for r in same) if same else None,
        "worst_mean_abs_norm": max((r["mean_abs_norm"] for r in same), default=None),
        "min_psnr_db": min(psnrs, default=None), "median_psnr_db": statistics.median(psnrs) if psnrs else None,
        # Stored sizes the draft scale divides (camera sizes): no partial pixel at the right and bottom
        # edges, whose rounding up stretches the image by up to 1/margin output pixel.
        "aligned": len(aligned),
        "aligned_max_abs_levels": max((r["max_abs_levels"] for r in aligned), default=None),
        "aligned_mean_abs_levels": _mean([r["mean_abs_levels"] for r in aligned]),
        "unaligned_max_abs_levels": max((r["max_abs_levels"] for r in same if r not in aligned), default=None),
        "unaligned_mean_abs_levels": _mean([r["mean_abs_levels"] for r in same if r not in aligned]),
        # The yardstick: the full decode's own distance from the scene as drawn (the JPEG's loss),
        # and the draft's, at the model's input.
        "jpeg_mean_abs_levels": _mean([r["jpeg"].get("mean_abs_levels") for r in records]),
        "jpeg_max_abs_levels": max((r["jpeg"]["max_abs_levels"] for r in records if r["jpeg"]), default=None),
        "draft_vs_lossless_mean_abs_levels": _mean([r.get("lossless", {}).get("mean_abs_levels") for r in same]),
        "decode_ms_full": total("decode_ms_full"), "decode_ms_draft": total("decode_ms_draft"),
        "prepare_ms_full": total("prepare_ms_full"), "prepare_ms_draft": total("prepare_ms_draft"),
        "speedup": full_ms / draft_ms if draft_ms else None,
        "decode_speedup": total("decode_ms_full") / total("decode_ms_draft"),
    }


def answer(rows: list[dict[str, Any]], config: str, margins: tuple[float, ...]) -> dict[Any, list[dict[str, Any]]]:
    """Per margin (None: full decode), the rows through the job's stages in this process."""
    from pipeline.stages.decode import DecodeStage
    from pipeline.stages.encode import EncodeStage
    from pipeline.stages.prepare import PrepareStage
    from pipeline.io.schema import answer_columns
    from pipeline.stages.text import TextStage
    from pipeline.tasks import one_answer

    cfg = load_config(REPO / config, {"input.path": "unused", "model.path": "tiny:llava-shapes"})
    columns = ("id", "image", "prompt", "expected", "question_type")  # the world's task labels are not needed

    def batches(size: int) -> list[dict[str, np.ndarray]]:
        return [{k: np.array([r[k] for r in rows[s : s + size]], dtype=object) for k in columns}
                for s in range(0, len(rows), size)]

    text = TextStage(cfg.text_stage)
    texted = [text(b) for b in batches(cfg.text_stage.batch_size)]
    merged = {k: np.concatenate([b[k] for b in texted]) if isinstance(texted[0][k], np.ndarray)
              else [x for b in texted for x in b[k]] for k in texted[0]}
    encode = EncodeStage(cfg.model, cfg.pruning, cfg.encode_stage)
    decode = DecodeStage(cfg.model, cfg.generation, cfg.input, cfg.decode_stage)
    out: dict[Any, list[dict[str, Any]]] = {}
    size = cfg.prepare_stage.batch_size  # one batch size for all three: the same rows meet in every call
    for margin in [None, *margins]:
        prepare = PrepareStage(cfg.model, cfg.input.model_copy(update={"jpeg_draft_margin": margin}), cfg.prepare_stage)
        done = []
        for s in range(0, len(rows), size):
            batch = {k: (v[s : s + size].copy() if isinstance(v, np.ndarray) else list(v[s : s + size]))
                     for k, v in merged.items()}
            result = decode(encode(prepare(batch)))
            result |= answer_columns(result, one_answer())  # the one-answer view: answer, kept_indices
            done += [{k: result[k][i] for k in ("id", "prompt", "expected", "question_type", "answer", "error",
                                               "kept_indices", "prepare_ms")} for i in range(len(result["id"]))]
        out[margin] = done
        print(f"  answers: margin {margin} done", flush=True)
    return out


def summarise_answers(runs: dict[Any, list[dict[str, Any]]]) -> dict[str, Any]:
    from pipeline.quality.scoring import label_scores

    full = runs[None]
    out: dict[str, Any] = {}
    for margin, rows in runs.items():
        tag = "full" if margin is None else f"m{margin:g}"
        scores = label_scores(rows)
        out[f"accuracy_{tag}"] = scores["accuracy"]
        out[f"caption_f1_{tag}"] = scores["caption_f1"]
        out[f"errors_{tag}"] = sum(bool(r["error"]) for r in rows)
        out[f"stage_prepare_ms_mean_{tag}"] = statistics.mean(float(r["prepare_ms"]) for r in rows)
        if margin is not None:
            differ = [(a, b) for a, b in zip(full, rows, strict=True) if a["answer"] != b["answer"]]
            out[f"answers_{tag}_differ"] = len(differ)
            overlaps = [len(set(a["kept_indices"]) & set(b["kept_indices"])) / max(1, len(a["kept_indices"]))
                        for a, b in zip(full, rows, strict=True)]
            out[f"kept_sets_{tag}_differ"] = sum(o < 1 for o in overlaps)
            out[f"kept_overlap_{tag}_mean"] = statistics.mean(overlaps)
            out[f"kept_overlap_{tag}_min"] = min(overlaps)
            for a, b in differ:
                question = a["prompt"].splitlines()[0]
                print(f"  differs at margin {margin:g}: {a['id']} [{a['question_type']}] {question!r} expected "
                      f"{a['expected']!r}: full {a['answer']!r} -> draft {b['answer']!r}")
    return out


def _margins(text: str) -> tuple[float, ...]:
    try:
        margins = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        margins = ()
    if not margins or any(not 1.0 <= m <= 16.0 for m in margins):
        raise argparse.ArgumentTypeError(f"expected margins in [1, 16], comma-separated, got {text!r}")
    return margins


def _sides(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        lo = hi = 0
    if not 8 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX pixels per side, 8 <= MIN <= MAX, got {text!r}")
    return lo, hi


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_pixels(name: str, margin: float, s: dict[str, Any]) -> None:
    """One processor and margin: the table's row, then its detail lines."""
    f, pad = _fmt, " " * 26
    print(f"{name:<18} {margin:>6g} {s['engaged']:>4}/{s['images']:<3} "
          f"{s['shape_changed']:>6}/{s['tokens_changed']:<6} {f(s['max_abs_levels'], '8.0f')} "
          f"{f(s['mean_abs_levels'], '9.3f')} {f(s['max_abs_norm'], '9.3f')} "
          f"{f(s['mean_abs_norm'], '10.4f')} {f(s['min_psnr_db'], '9.1f')} {f(s['median_psnr_db'], '9.1f')} "
          f"{s['decode_speedup']:>9.2f} {f(s['speedup'], '10.2f')}")
    print(f"{pad}scales {s['scales']}; worst image mean {f(s['worst_mean_abs_levels'], '.3f')} levels / "
          f"{f(s['worst_mean_abs_norm'], '.4f')} norm; ms decode {s['decode_ms_full']:.0f} -> "
          f"{s['decode_ms_draft']:.0f}, prepare {s['prepare_ms_full']:.0f} -> {s['prepare_ms_draft']:.0f}")
    print(f"{pad}sizes the scale divides ({s['aligned']}): max {f(s['aligned_max_abs_levels'], '.0f')}, mean "
          f"{f(s['aligned_mean_abs_levels'], '.3f')} levels; others: max {f(s['unaligned_max_abs_levels'], '.0f')}, "
          f"mean {f(s['unaligned_mean_abs_levels'], '.3f')} levels")
    print(f"{pad}the JPEG's own loss at the model input (full decode vs the scene as drawn): mean "
          f"{f(s['jpeg_mean_abs_levels'], '.3f')}, max {f(s['jpeg_max_abs_levels'], '.0f')} levels; "
          f"draft vs the scene as drawn: mean {f(s['draft_vs_lossless_mean_abs_levels'], '.3f')} levels")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=80)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--sides", type=_sides, default=SIDES, help="MIN:MAX pixels per side (default 1344:4032)")
    parser.add_argument("--margins", type=_margins, default=MARGINS, help="draft margins to compare (default 2,1)")
    parser.add_argument("--repeats", type=int, default=3, help="decode timings per image and variant (median)")
    parser.add_argument("--config", default="configs/local.yaml", help="stage, pruning and generation settings")
    parser.add_argument("--no-answers", action="store_true", help="pixels and timings only")
    args = parser.parse_args()
    print(f"torch threads={torch.get_num_threads()} families={','.join(ADAPTERS)}", flush=True)
    rows = large_rows(args.scenes, args.seed, args.sides)
    print(f"corpus: {len(rows)} scenes, seed {args.seed}, sides {args.sides[0]}..{args.sides[1]}, "
          f"{sum(len(r['image']) for r in rows) / 2**20:.1f} MiB of JPEG", flush=True)
    result: dict[str, Any] = {"scenes": len(rows), "seed": args.seed}
    with tempfile.TemporaryDirectory() as tmp:
        procs = processors(Path(tmp))
        records = compare_pixels(rows, procs, args.margins, args.repeats)
    print(f"\n{'processor':<18} {'margin':>6} {'engaged':>8} {'shape/tok chg':>13} {'max lvl':>8} {'mean lvl':>9} "
          f"{'max norm':>9} {'mean norm':>10} {'min PSNR':>9} {'med PSNR':>9} {'decode x':>9} {'dec+prep x':>10}")
    for (name, margin), recs in records.items():
        s = summarise_pixels(recs)
        print_pixels(name, margin, s)
        tag = f"{name}_m{margin:g}"
        for key in ("engaged", "shape_changed", "tokens_changed", "max_abs_levels", "mean_abs_levels",
                    "worst_mean_abs_levels", "max_abs_norm", "mean_abs_norm", "worst_mean_abs_norm", "min_psnr_db",
                    "median_psnr_db", "aligned", "aligned_max_abs_levels", "aligned_mean_abs_levels",
                    "unaligned_max_abs_levels", "unaligned_mean_abs_levels", "jpeg_mean_abs_levels",
                    "jpeg_max_abs_levels", "draft_vs_lossless_mean_abs_levels", "decode_speedup", "speedup"):
            value = s[key]
            result[f"{tag}_{key}"] = round(value, 4) if isinstance(value, float) else value
    if not args.no_answers:
        runs = answer(rows, args.config, args.margins)
        summary = summarise_answers(runs)
        print("\n" + "\n".join(f"{k}: {_fmt(v, '.4f') if isinstance(v, float) else v}" for k, v in summary.items()))
        result |= {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
