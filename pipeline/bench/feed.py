"""Benchmark: what feeding one GPU costs on the host, before and after the CPU preparation stage.

    python -m pipeline.bench.feed [--families llava,llava_next,qwen2_5_vl,qwen3_vl,qwen3_5]
                                  [--sizes 640x480,1280x960,4032x3024] [--repeats 7]
                                  [--write-table configs/cpu_prepare.yaml]

Each family runs at its cluster config's settings (``FAMILY_CONFIGS``: the image processor of
``model.architecture``, the committed checkpoint JSON, with the config's ``model.min_pixels`` /
``max_pixels`` and ``input.jpeg_draft_margin``) on a synthetic photo-like JPEG of each size (a
smooth gradient, soft-edged shapes, texture and mild noise at quality 90; no weights are loaded).
One thread (``torch.set_num_threads(1)``), one warm-up round, then rounds that run every step of
every family and size once (in rotating order), medians of the rounds:

- before (the old inline path, all of it host-side in the GPU encode actor): ``decode_image``
  (every pixel) + the stock processor call the old actor made (``image_processor(images=[img],
  return_tensors="pt")``; Qwen with ``size=adapter.size``) -> ``gpu_actor_host_ms_before``;
  its ``resize`` share is ``prepare_image`` on the same decoded image, ``rest`` the remainder
  (rescale, normalise, float32, Qwen's patchify);
- after, the preparation stage (a CPU actor): ``decode_image`` with the config's JPEG draft
  scale + ``adapter.prepare_image`` + ``payload_bytes`` -> ``prepare_ms`` (``decode_ms`` /
  ``resize_ms`` / ``serialise_ms``), and the same with every pixel decoded
  (``prepare_full_decode_ms``);
- after, the GPU actor's host side: ``payload_from_bytes`` + ``torch.as_tensor`` of the uint8
  pixels -> ``gpu_actor_host_ms_after``; the ``PixelLUT`` (+ Qwen's patchify) run here on the
  CPU is ``device_work_ms_on_cpu`` (device work on a GPU node), and its output is checked to be
  the stock processor's, bit for bit (``output_identical``, full-decode variant);
- bytes a row carries: the prepared uint8 payload against the processor's float32 pixel values;
- ``gpu_ms_estimate``: the cost model's vision + prefill time per image on the config's
  accelerator (an H100) at the config's budget (``pipeline.cost.planner.estimate``, as
  ``jobs/plan_cost.py`` calls it), and ``images_per_second_per_gpu`` (decode included), from
  which ``cores_per_gpu = prepare_ms x images/s / 1000``: cores that keep one GPU fed.

Target (printed, exit status 0 either way): ``gpu_actor_host_ms_after <= 0.1 x gpu_ms_estimate``
for every family at 640x480 and 1280x960 (``target_met`` per family and size). ``--write-table``
writes the measured ``prepare_ms`` as the CPU table (``configs/cpu_prepare.yaml``). The last line
is ``RESULT {json}``: per-image figures keyed ``{family: {"WxH": value}}``, then the run's settings.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw, ImageFilter

from pipeline.bench.prefill import cpu_seconds
from pipeline.config import JobConfig, ModelConfig, load_config
from pipeline.cost import planner
from pipeline.cost.accounting import accelerator_price
from pipeline.cost.prices import load_accelerators, load_prices
from pipeline.io.images import decode_image, draft_target
from pipeline.models import (
    VisionLanguageAdapter,
    detect_family,
    load_adapter,
    model_shapes,
    payload_bytes,
    payload_from_bytes,
    token_counts,
)
from pipeline.models.base import PixelLUT
from pipeline.pruning import budget

REPO = Path(__file__).resolve().parents[2]


def cluster_configs() -> dict[str, str]:
    """family -> the cluster config it runs at here: each ``configs/*.yaml`` that names a
    ``model.architecture`` (committed checkpoint JSON, so no weights and no network), by the family
    of that checkpoint. A new family's real-checkpoint config is picked up without a list to edit."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        model = (yaml.safe_load(path.read_text()) or {}).get("model")
        arch = model.get("architecture") if isinstance(model, dict) else None
        if not arch:
            continue
        family = detect_family(str(REPO / arch))
        if family in found:
            raise ValueError(f"two cluster configs for {family}: {found[family]} and {path.relative_to(REPO)}")
        found[family] = str(path.relative_to(REPO))
    return found


FAMILY_CONFIGS = cluster_configs()
SIZES = [(640, 480), (1280, 960), (4032, 3024)]
TARGET_SIZES = ("640x480", "1280x960")  # where the host-side target applies
TARGET_SHARE = 0.1  # gpu_actor_host_ms_after <= this x gpu_ms_estimate
JPEG_QUALITY = 90
TABLE_HEADER = (
    "# CPU milliseconds per image in the preparation stage (decode + the family's share of its image\n"
    "# processor + serialising), one thread. Written by: python -m pipeline.bench.feed --write-table "
    "configs/cpu_prepare.yaml\n"
)


# ---------------------------------------------------------------- inputs


def synthetic_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A photo-like JPEG: a sky-to-ground gradient with slow colour drift, soft-edged shapes,
    band-limited texture and mild sensor noise, at quality 90 (PIL's default 4:2:0 chroma). The
    scene is laid out in relative coordinates, so every size shows the same picture. White noise
    would defeat the JPEG coder and a flat image would flatter it; decode cost follows the coded
    bytes, so neither is a fair input."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width, y / height
    sky, ground = np.array([120, 165, 215], np.float32), np.array([95, 120, 70], np.float32)
    horizon = 0.55 + 0.05 * np.sin(2 * math.pi * (u * 1.3 + 0.2))
    t = np.clip((v - horizon) * 8 + 0.5, 0, 1)[..., None]
    base = (1 - t) * (sky + 40 * (1 - v[..., None])) + t * ground
    for _ in range(3):  # slow colour drift: light falling off, haze
        fx, fy, phase = rng.uniform(0.5, 2.5), rng.uniform(0.5, 2.5), rng.uniform(0, 2 * math.pi)
        base += rng.uniform(-12, 12, 3).astype(np.float32) * np.sin(2 * math.pi * (fx * u + fy * v) + phase)[..., None]
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0.2, 1), rng.uniform(0.02, 0.12)
        box = [cx * width, cy * height, (cx + r) * width, (cy + r * rng.uniform(0.5, 1.5)) * height]
        colour = tuple(int(c) for c in rng.integers(20, 235, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            corners = rng.uniform(0, 1, (5, 2)) * [box[2] - box[0], box[3] - box[1]] + box[:2]
            draw.polygon([tuple(c) for c in corners.tolist()], fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(radius=max(0.6, width / 1600)))  # optics: no razor edges
    # Texture (foliage, fabric, gravel): noise at a fixed scale of the scene, stronger on the ground,
    # then sensor noise per pixel. Without it the JPEG codes at ~1 bit a pixel, well below photos.
    pixels = np.asarray(img, dtype=np.float32)
    for grid, amplitude in (((120, 160), 18), ((max(2, height // 3), max(2, width // 3)), 12)):
        layer = Image.fromarray(rng.integers(0, 256, grid, dtype=np.uint8), "L").resize((width, height), Image.BICUBIC)
        pixels += (0.25 + t) * amplitude * ((np.asarray(layer, dtype=np.float32) - 128) / 128)[..., None]
    pixels += rng.normal(0, 3.0, (height, width, 3)).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def family_config(family: str) -> tuple[JobConfig, ModelConfig]:
    """The family's cluster config and its model settings pointed at ``model.architecture`` (the
    committed checkpoint JSON: config.json + preprocessor_config.json, enough for the "image" part)."""
    cfg = load_config(REPO / FAMILY_CONFIGS[family])
    arch = cfg.model.architecture
    if not arch:
        raise ValueError(f"{FAMILY_CONFIGS[family]}: model.architecture is needed to run offline")
    arch = str(REPO / arch) if not Path(arch).is_absolute() else arch
    model = ModelConfig.model_validate({**cfg.model.model_dump(), "path": arch, "family": family})
    if detect_family(arch) != family:
        raise ValueError(f"{arch} is not a {family} checkpoint")
    return cfg, model


# ---------------------------------------------------------------- the two paths


def stock_processor(adapter: VisionLanguageAdapter) -> Callable[[Image.Image], dict]:
    """The processor call the GPU actor made before the preparation stage (same processor, the PIL
    backend: what the actors ran without torchvision)."""
    ip = adapter.image_processor
    options: dict[str, Any] = {"return_tensors": "pt"}
    if getattr(adapter, "size", None) is not None:  # dynamic resolution (Qwen): the config's pixel bounds
        options["size"] = adapter.size
    if adapter.family == "llava_next":
        options["do_pad"] = True
    return lambda img: ip(images=[img], **options)


def device_work(adapter: VisionLanguageAdapter, lut: PixelLUT) -> Callable[[torch.Tensor], torch.Tensor]:
    """What ``encode_prepared`` does on the device before the vision tower, here on the CPU: the
    lookup (rescale + normalise) and, for Qwen, the processor's patchify."""
    if hasattr(adapter, "patchify"):
        return lambda pixels: adapter.patchify(lut(pixels, torch.float32))[0]
    return lambda pixels: lut(pixels, torch.float32)


class Cell:
    """One family on one JPEG: every step of both paths, timed one round at a time (``main`` runs
    a round of every cell before the next round, so a slow spell of a shared machine falls on all
    cells alike rather than on whichever ran then)."""

    STEPS = ("before_decode", "before_processor", "decode", "resize", "serialise", "resize_full", "serialise_full",
             "host_after", "device")

    def __init__(self, adapter: VisionLanguageAdapter, data: bytes, max_pixels: int, min_side: int,
                 margin: float | None) -> None:
        self.adapter, self.data, self.max_pixels, self.min_side = adapter, data, max_pixels, min_side
        self.draft = draft_target(adapter.input_size, margin) if margin is not None else None
        self.stock = stock_processor(adapter)
        self.on_device = device_work(adapter, PixelLUT(adapter.image_processor, torch.device("cpu")))
        for draft in (None, self.draft):
            if isinstance(failed := decode_image(data, max_pixels, min_side, draft), str):
                raise ValueError(f"the benchmark image does not decode: {failed}")
        self.times: dict[str, list[float]] = {}

    def round(self, record: bool) -> None:
        """Every step once, in pipeline order; ``record`` False for the warm-up."""
        clock = time.perf_counter
        t = [clock()]
        full = decode_image(self.data, self.max_pixels, self.min_side)  # before: every pixel, in the GPU actor
        t.append(clock())
        self.stock_out = self.stock(full)
        t.append(clock())
        small = decode_image(self.data, self.max_pixels, self.min_side, self.draft)  # after: the preparation stage
        t.append(clock())
        prepared = self.adapter.prepare_image(small)
        t.append(clock())
        self.wire = payload_bytes(prepared)
        t.append(clock())
        prepared_full = self.adapter.prepare_image(full)  # after with every pixel decoded (the decode is before's)
        t.append(clock())
        self.wire_full = payload_bytes(prepared_full)
        t.append(clock())
        pixels = torch.as_tensor(payload_from_bytes(self.wire)["pixels"])  # the GPU actor's host side
        t.append(clock())
        self.on_device(pixels)  # device work on a GPU node
        t.append(clock())
        self.sizes = (full.size, small.size)
        if not record:
            return
        for name, a, b in zip(self.STEPS, t[:-1], t[1:], strict=True):
            self.times.setdefault(name, []).append(b - a)
        self.times.setdefault("prepare", []).append(t[5] - t[2])
        self.times.setdefault("prepare_full", []).append(t[1] - t[0] + t[7] - t[5])
        self.times.setdefault("before", []).append(t[2] - t[0])

    def figures(self) -> dict[str, Any]:
        """Medians of the recorded rounds in ms, the bytes a row carries, and whether the lookup
        (+ patchify) of the full-decode prepared pixels is the stock processor's output."""
        ms = {k: 1e3 * statistics.median(v) for k, v in self.times.items()}
        stock_pixels = self.stock_out["pixel_values"]
        own = self.on_device(torch.as_tensor(payload_from_bytes(self.wire_full)["pixels"]))
        (w, h), (dw, dh) = self.sizes
        return {
            "jpeg_bytes": len(self.data),
            "decoded_size": f"{dw}x{dh}",
            "input_size": "x".join(map(str, self.adapter.input_size(w, h))),
            "before_decode_ms": ms["before_decode"],
            "before_processor_ms": ms["before_processor"],
            "before_resize_ms": ms["resize_full"],
            "before_rest_ms": ms["before_processor"] - ms["resize_full"],
            "gpu_actor_host_ms_before": ms["before"],
            "decode_ms": ms["decode"],
            "resize_ms": ms["resize"],
            "serialise_ms": ms["serialise"],
            "prepare_ms": ms["prepare"],
            "prepare_full_decode_ms": ms["prepare_full"],
            "gpu_actor_host_ms_after": ms["host_after"],
            "device_work_ms_on_cpu": ms["device"],
            "prepared_bytes": len(self.wire),
            "float32_bytes": int(stock_pixels.numel() * 4),
            "output_identical": bool(torch.equal(own.reshape(-1), stock_pixels.to(torch.float32).reshape(-1))),
        }


# ---------------------------------------------------------------- the GPU side, from the cost model


def gpu_estimate(cfg: JobConfig, model: ModelConfig, family: str, width: int, height: int) -> dict[str, Any]:
    """The planner's per-image estimate at the config's budget, accelerator and decode engine
    (as ``jobs/plan_cost.py`` makes it, with the accelerator table's assumptions): vision +
    prefill milliseconds, and images per second per GPU with decode included."""
    table = load_accelerators(REPO / "configs" / "accelerators.yaml")
    name = cfg.cost.accelerator
    if name not in table.accelerators:
        raise ValueError(f"cost.accelerator {name!r} is not in configs/accelerators.yaml")
    accelerator, assume = table.accelerators[name], table.assumptions
    shapes = model_shapes(model.path, family)
    n_visual, patches = token_counts(model.path, model, width, height, family)
    keep = budget(n_visual, keep=cfg.pruning.keep, prune_ratio=cfg.pruning.prune_ratio)
    row = planner.estimate(
        shapes, model=planner.model_label(cfg.model.path), method=cfg.pruning.method, keep=keep,
        visual_tokens_in=n_visual, encoder_patches=patches, accelerator_name=name, accelerator=accelerator,
        price=accelerator_price(load_prices(cfg.cost.prices), name), assume=assume, images=1, gpus=1,
        engine=cfg.decode_stage.engine, max_new_tokens=cfg.generation.max_new_tokens,
    )
    vision_s = row.flops_vision_per_image / (accelerator.bf16_flops * assume.vision_mfu)
    prefill_s = row.flops_prefill_per_image / (accelerator.bf16_flops * assume.prefill_mfu)
    return {"accelerator": name, "visual_tokens": n_visual, "keep": keep, "encoder_patches": patches,
            "gpu_ms_estimate": 1e3 * (vision_s + prefill_s), "images_per_second_per_gpu": row.images_per_second_per_gpu}


# ---------------------------------------------------------------- the run


def machine() -> str:
    """CPU model and core count, for the table and the RESULT line."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def _sizes(text: str) -> list[tuple[int, int]]:
    """``WxH,WxH,...``."""
    try:
        sizes = [tuple(int(x) for x in part.lower().split("x")) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 8 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected WxH[,WxH...] with sides >= 8, got {text!r}")
    return sizes  # type: ignore[return-value]


def _families(text: str) -> list[str]:
    families = [f.strip() for f in text.split(",") if f.strip()]
    if not families or set(families) - set(FAMILY_CONFIGS):
        raise argparse.ArgumentTypeError(f"families are {', '.join(FAMILY_CONFIGS)}; got {text!r}")
    return families


def table_yaml(prepare_ms: dict[str, dict[str, float]], *, date: str, machine: str, command: str,
               margin: float | None) -> str:
    """The CPU table (``configs/cpu_prepare.yaml``), in the format its reader expects."""
    lines = [TABLE_HEADER.rstrip("\n"), "measured:", f"  date: {json.dumps(date)}", f"  machine: {json.dumps(machine)}",
             f"  command: {json.dumps(command)}", f"  jpeg_draft_margin: {json.dumps(margin)}",
             "prepare_ms:          # family -> \"WxH\" -> ms per image"]
    for family, by_size in prepare_ms.items():
        cells = ", ".join(f"{json.dumps(size)}: {round(ms, 1)}" for size, ms in by_size.items())
        lines.append(f"  {family}: {{{cells}}}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", type=_families, default=list(FAMILY_CONFIGS),
                        help="comma-separated, of " + ", ".join(FAMILY_CONFIGS) + " (default: all)")
    parser.add_argument("--sizes", type=_sizes, default=SIZES,
                        help="JPEG sizes, WxH,... (default: " + ",".join(f"{w}x{h}" for w, h in SIZES) + ")")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds after a warm-up (medians; default 7)")
    parser.add_argument("--write-table", type=Path, metavar="PATH",
                        help="write the measured prepare_ms as the CPU table (configs/cpu_prepare.yaml)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    torch.set_num_threads(1)  # one core's figures: the table is per core

    configs = {family: family_config(family) for family in args.families}
    margins = {family: cfg.input.jpeg_draft_margin for family, (cfg, _) in configs.items()}
    if args.write_table and len(set(margins.values())) > 1:
        parser.error(f"the CPU table records one jpeg_draft_margin; the configs differ: {margins}")
    jpegs = {f"{w}x{h}": synthetic_jpeg(w, h) for w, h in dict.fromkeys(args.sizes)}
    load_before = os.getloadavg()
    busy0, wall0 = cpu_seconds()
    own0 = time.process_time()
    cells: dict[tuple[str, str], Cell] = {}
    for family, (cfg, model) in configs.items():
        adapter = load_adapter(model, "image")
        for size, data in jpegs.items():
            cells[family, size] = Cell(adapter, data, cfg.input.max_image_pixels, cfg.input.min_image_side,
                                       margins[family])
    order = list(cells.values())
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for cell in order[round_ % len(order):] + order[: round_ % len(order)]:  # rotated: no cell always first
            cell.round(record=round_ > 0)
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for family, (cfg, model) in configs.items():
        for w, h in args.sizes:
            size = f"{w}x{h}"
            r = cells[family, size].figures() | gpu_estimate(cfg, model, family, w, h)
            r["cores_per_gpu"] = r["prepare_ms"] * r["images_per_second_per_gpu"] / 1000
            r["target_met"] = r["gpu_actor_host_ms_after"] <= TARGET_SHARE * r["gpu_ms_estimate"]
            rows.setdefault(family, {})[size] = r
    busy1, wall1 = cpu_seconds()
    load_after = os.getloadavg()
    wall = wall1 - wall0
    others = (busy1 - busy0) - (time.process_time() - own0)  # CPU time other processes took meanwhile

    date = datetime.date.today().isoformat()
    # Shared machines: what other processes took meanwhile says how contended the figures are.
    where = (f"{machine()}, shared with other work: it used {others / wall:.2f} cores on average during the run "
             f"(1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after); one thread measured")
    print(f"{where}; torch {torch.__version__}, threads {torch.get_num_threads()}; {args.repeats} rounds "
          f"after a warm-up, medians; {date}")
    print("JPEGs (synthetic, quality 90): " + ", ".join(f"{s} {len(d) / 1e3:.0f} kB" for s, d in jpegs.items()))
    print(f"{'family':<11} {'size':>9} | {'before: decode':>14} {'resize':>7} {'rest':>7} {'= host':>7} | "
          f"{'after: decode':>13} {'draft to':>10} {'resize':>7} {'ser.':>5} {'= prep':>7} {'(full dec.)':>11} | "
          f"{'host':>5} {'dev@cpu':>7} | {'uint8 kB':>8} {'f32 kB':>7} | {'GPU est':>7} {'img/s':>6} "
          f"{'cores':>5} {'target':>6}")
    for family, by_size in rows.items():
        for size, r in by_size.items():
            print(
                f"{family:<11} {size:>9} | {r['before_decode_ms']:>14.1f} {r['before_resize_ms']:>7.1f} "
                f"{r['before_rest_ms']:>7.1f} {r['gpu_actor_host_ms_before']:>7.1f} | {r['decode_ms']:>13.1f} "
                f"{r['decoded_size']:>10} {r['resize_ms']:>7.1f} {r['serialise_ms']:>5.2f} {r['prepare_ms']:>7.1f} "
                f"{r['prepare_full_decode_ms']:>11.1f} | {r['gpu_actor_host_ms_after']:>5.2f} "
                f"{r['device_work_ms_on_cpu']:>7.1f} | {r['prepared_bytes'] / 1e3:>8.0f} "
                f"{r['float32_bytes'] / 1e3:>7.0f} | "
                f"{r['gpu_ms_estimate']:>7.2f} {r['images_per_second_per_gpu']:>6.1f} {r['cores_per_gpu']:>5.2f} "
                f"{'yes' if r['target_met'] else 'NO':>6}"
            )
    accelerators = {f: next(iter(by_size.values()))["accelerator"] for f, by_size in rows.items()}
    print("ms per image, one thread. before = the old GPU actor's host work (full decode + stock processor: resize, "
          "then rest = rescale/normalise/float32/patchify); after = the preparation stage (draft decode, "
          "prepare_image, payload_bytes) and the GPU actor's host side (payload_from_bytes + as_tensor); dev@cpu = "
          "PixelLUT (+ patchify), device work on a GPU node. GPU est = the cost model's vision + prefill on "
          f"{', '.join(sorted(set(accelerators.values())))} at the config's budget; cores = prep x img/s / 1000.")
    judged = [r["target_met"] for by_size in rows.values() for s, r in by_size.items() if s in TARGET_SIZES]
    target_pass = all(judged) if judged else None
    print(f"target: GPU actor host ms after <= {TARGET_SHARE} x GPU estimate at {' and '.join(TARGET_SIZES)}: "
          + ("n/a (sizes not run)" if target_pass is None else
             f"{'PASS' if target_pass else 'FAIL'} ({sum(judged)} of {len(judged)} family/size cells run met it)"))
    mismatched = [f"{f} {s}" for f, by_size in rows.items() for s, r in by_size.items() if not r["output_identical"]]
    print("prepared + lookup (+ patchify) equals the stock processor's pixel values bit for bit (full decode): "
          + ("every family and size" if not mismatched else "NO for " + ", ".join(mismatched)))
    print(f"other processes' CPU during the run: {others:.1f} CPU-s of {wall * (os.cpu_count() or 1):.1f}; "
          f"wall {wall:.1f} s")

    command = "python -m pipeline.bench.feed " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.write_table:
        margin = next(iter(margins.values()))
        text = table_yaml({f: {s: r["prepare_ms"] for s, r in by_size.items()} for f, by_size in rows.items()},
                          date=date, machine=where, command=command.strip(), margin=margin)
        args.write_table.parent.mkdir(parents=True, exist_ok=True)
        args.write_table.write_text(text)
        print(f"wrote {args.write_table}")

    def keyed(key: str, digits: int = 3) -> dict[str, dict[str, Any]]:
        return {f: {s: round(r[key], digits) if isinstance(r[key], float) else r[key] for s, r in by_size.items()}
                for f, by_size in rows.items()}

    result: dict[str, Any] = {key: keyed(key) for key in (
        "prepare_ms", "gpu_actor_host_ms_before", "gpu_actor_host_ms_after", "gpu_ms_estimate", "cores_per_gpu",
        "target_met", "decode_ms", "resize_ms", "serialise_ms", "prepare_full_decode_ms", "before_decode_ms",
        "before_processor_ms", "before_resize_ms", "before_rest_ms", "device_work_ms_on_cpu", "prepared_bytes",
        "float32_bytes", "images_per_second_per_gpu", "visual_tokens", "keep", "decoded_size", "input_size",
        "output_identical")}
    result |= {
        "target_pass": target_pass, "target_sizes": list(TARGET_SIZES), "target_share": TARGET_SHARE,
        "jpeg_bytes": {s: len(d) for s, d in jpegs.items()}, "jpeg_draft_margin": margins,
        "accelerator": accelerators,
        "repeats": args.repeats, "threads": torch.get_num_threads(), "machine": machine(), "date": date,
        "load_avg_1min": [round(load_before[0], 2), round(load_after[0], 2)],
        "other_processes_cpu_s": round(others, 1), "wall_s": round(wall, 1), "command": command.strip(),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
