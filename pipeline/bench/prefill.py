"""Benchmark: LLM prefill time against its analytic FLOPs at 576 / 192 / 128 / 64 visual tokens.

    python -m pipeline.bench.prefill [--model-path tiny:llava-bench] [--repeats 5] [--batch 1]
                                     [--device cpu|cuda|auto] [--dtype auto|float32|bfloat16|float16]
                                     [--threads N]

Loads the checkpoint through the real adapter (``load_adapter(..., "language")``) and times
the HF engine's ``generate(..., max_new_tokens=1)``: prefill plus one LM-head row, which is what
``prefill_flops`` counts. Visual tokens are real ones: a sample-corpus image is encoded by the
same checkpoint's vision part and the first K rows of its features are kept (prefill cost does
not depend on which tokens are kept, only on how many). Keeps are timed round-robin (every
repeat times every keep) so background load drifts hit them alike; medians after a warm-up.

Also prints both LLM-to-vision FLOP ratios (``prefill_flops(576 + text) / vision_flops(576)``):
this checkpoint's and LLaVA-1.5-7B's (``configs/checkpoints/llava-1.5-7b-hf``), at the same text
token count, and the vision encode time of one image for context.

Target (PASS/FAIL printed, exit status 0 either way): measured speed-up at keep 128 vs keep-all
>= 0.8 x the FLOPs ratio at 128 (small GEMMs run below peak, so some shortfall is expected).
The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from pipeline.config import GenerationConfig, ModelConfig
from pipeline.cost.flops import prefill_flops, vision_flops
from pipeline.engines.hf import HFEngine
from pipeline.models import DecodeRequest, detect_family, load_adapter, model_shapes
from pipeline.models.sources import resolve_model_path
from pipeline.tiny.shapes_world import make_rows

REFERENCE = Path(__file__).resolve().parents[2] / "configs" / "checkpoints" / "llava-1.5-7b-hf"
KEEPS = (192, 128, 64)  # timed besides keep-all (the encoder's token count)
# LLaVA-1.5's VQAv2 evaluation format: a realistic short question plus the answer-format suffix.
PROMPT = "What color is the circle?\nAnswer the question using a single word or phrase."
TARGET = 0.8


def llm_to_vision_ratio(path: str, text_tokens: int, visual_tokens: int = 576, family: str = "auto") -> float:
    """Prefill FLOPs over ``visual_tokens + text_tokens`` divided by the vision encoder's FLOPs
    for one image: how much of a keep-all request the LLM accounts for."""
    shapes = model_shapes(path, family)
    return prefill_flops(shapes.language, visual_tokens + text_tokens) / vision_flops(shapes.vision, visual_tokens)


# ---- machine-load helpers (Linux /proc; also used by pipeline.py). Benchmarks here may share
# the machine with other work: these say how much CPU something else took during a measurement.


def cpu_seconds() -> tuple[float, float]:
    """(CPU-seconds all processes on the machine have been busy, monotonic wall time), from
    /proc/stat; (nan, wall) where unavailable. A difference over a run, minus our own processes'
    CPU time, is what other processes took meanwhile."""
    wall = time.perf_counter()
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return float("nan"), wall
    busy = fields[0] + fields[1] + fields[2] + sum(fields[5:7])  # user nice system irq softirq
    return busy / os.sysconf("SC_CLK_TCK"), wall


def process_cpu() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, title, CPU-seconds so far) of every process (all its threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            title = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")[:60]
        except OSError:
            continue  # exited meanwhile
        rest = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
        out[int(d.name)] = (int(rest[1]), title or stat[stat.index("(") + 1 : stat.rindex(")")], (int(rest[11]) + int(rest[12])) / tick)
    return out


def descendants(snapshot: dict[int, tuple[int, str, float]], root: int) -> set[int]:
    """``root`` and every process below it (Ray's raylet and workers, for a local ray.init)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in snapshot.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        found.add(pid)
        stack.extend(children.get(pid, []))
    return found


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(model_path: str, repeats: int, batch: int, device: str, dtype: str) -> dict[str, object]:
    """Measure everything and return the figures (printing is left to ``main``)."""
    path = resolve_model_path(model_path)
    family = detect_family(path)
    cfg = ModelConfig(path=path, family=family, device=device, dtype=dtype)
    vision = load_adapter(cfg, "vision")
    language = load_adapter(cfg, "language")
    dev = language.device

    rows = make_rows(batch, seed=0)
    images = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in rows]
    encoded = vision.encode(images)
    features = [f.to(dev) for f in encoded.features]  # [N, D] per image
    n_visual = int(features[0].shape[0])
    keeps = [n_visual] + [k for k in KEEPS if k < n_visual]
    prompts = [PROMPT] * batch  # one prompt for every row: uniform lengths, no padding in the batch
    gen = GenerationConfig(max_new_tokens=1)

    engine = HFEngine(language)

    def prefill(k: int) -> Callable[[], object]:
        kept = torch.arange(k)
        rows = [DecodeRequest(str(i), prompt, f[:k], kept, language.kept_payload(payload, kept))
                for i, (prompt, f, payload) in enumerate(zip(prompts, features, encoded.payloads, strict=True))]
        return lambda: engine.generate(rows, gen)

    calls = {k: prefill(k) for k in keeps}
    # Warm-up (allocator, kernel selection) and the prompt length: generate reports the prefilled
    # sequence length, so text tokens = prompt_tokens - K without reaching into the tokenizer.
    text_tokens = {k: calls[k]()[0].prompt_tokens - k for k in keeps}
    times: dict[int, list[float]] = {k: [] for k in keeps}
    for _ in range(repeats):
        for k in keeps:
            times[k].append(_time_once(calls[k], dev))

    one_image = [images[0]]
    vision.encode(one_image)  # warm-up
    encode_s = statistics.median(_time_once(lambda: vision.encode(one_image), dev) for _ in range(repeats))

    shapes = model_shapes(path, family)
    full = keeps[0]
    text = text_tokens[full]
    table = []
    for k in keeps:
        seq = text_tokens[k] + k
        flops = batch * prefill_flops(shapes.language, seq)
        t = statistics.median(times[k])
        table.append({"keep": k, "prompt_tokens": seq, "flops": flops, "seconds": t, "all_seconds": times[k]})
    base = table[0]
    for row in table:
        row["speedup"] = base["seconds"] / row["seconds"]
        row["flops_ratio"] = base["flops"] / row["flops"]
        row["efficiency"] = row["speedup"] / row["flops_ratio"]
        row["gflops_per_s"] = row["flops"] / row["seconds"] / 1e9

    return {
        "model_path": path,
        "device": str(dev),
        "dtype": str(language.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "batch": batch,
        "repeats": repeats,
        "visual_tokens": n_visual,
        "text_tokens": text,
        "table": table,
        "encode_seconds": encode_s,
        "vision_flops": vision_flops(shapes.vision, n_visual),
        "llm_to_vision_flops_ratio": llm_to_vision_ratio(path, text, n_visual, family),
        # Same text-token count for the reference: the ratio compares architectures, not tokenizers.
        "reference_llm_to_vision_flops_ratio": llm_to_vision_ratio(str(REFERENCE), text, 576, "llava"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default="tiny:llava-bench", help="tiny:<recipe>, a checkpoint dir or hub id")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per keep (median), after a warm-up")
    parser.add_argument("--batch", type=int, default=1, help="images per prefill call")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="auto: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, = cores)")
    args = parser.parse_args()
    if args.repeats < 1 or args.batch < 1:
        parser.error("--repeats and --batch must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    busy0, wall0 = cpu_seconds()
    own0 = time.process_time()
    r = run(args.model_path, args.repeats, args.batch, args.device, args.dtype)
    busy1, wall1 = cpu_seconds()
    wall = wall1 - wall0
    others = (busy1 - busy0) - (time.process_time() - own0)  # CPU time other processes took meanwhile
    table = r["table"]
    print(
        f"model={r['model_path']} device={r['device']} dtype={r['dtype']} threads={r['threads']} "
        f"torch={torch.__version__} batch={r['batch']} repeats={r['repeats']} (median after warm-up)"
    )
    print(f"prompt: {PROMPT!r} -> {r['text_tokens']} text tokens + K visual tokens (first K of {r['visual_tokens']} encoded)")
    print(
        f"{'keep':>5} {'prompt tok':>10} {'prefill GFLOP':>13} {'time ms':>9} {'GFLOP/s':>8} "
        f"{'speed-up':>8} {'FLOPs ratio':>11} {'speed-up/FLOPs':>14}"
    )
    for row in table:
        print(
            f"{row['keep']:>5} {row['prompt_tokens']:>10} {row['flops'] / 1e9:>13.2f} {1e3 * row['seconds']:>9.1f} "
            f"{row['gflops_per_s']:>8.1f} {row['speedup']:>8.2f} {row['flops_ratio']:>11.2f} {row['efficiency']:>14.2f}"
        )
    print(
        f"vision encode, 1 image: {1e3 * r['encode_seconds']:.1f} ms ({r['vision_flops'] / 1e9:.2f} GFLOP, "
        f"{r['vision_flops'] / r['encode_seconds'] / 1e9:.1f} GFLOP/s)"
    )
    ratio, ref = r["llm_to_vision_flops_ratio"], r["reference_llm_to_vision_flops_ratio"]
    print(
        f"LLM-to-vision FLOPs ratio at {r['visual_tokens']} + {r['text_tokens']} tokens: this model {ratio:.2f}, "
        f"LLaVA-1.5-7B {ref:.2f} ({100 * (ratio / ref - 1):+.1f}%)"
    )
    at128 = next((row for row in table if row["keep"] == 128), None)
    verdict = None
    if at128 is not None:
        verdict = at128["speedup"] >= TARGET * at128["flops_ratio"]
        print(
            f"target: speed-up at 128 >= {TARGET} x FLOPs ratio: {at128['speedup']:.2f} vs "
            f"{TARGET * at128['flops_ratio']:.2f} -> {'PASS' if verdict else 'FAIL'}"
        )
    load_after = os.getloadavg()
    # Shared machines: a load average well above the thread count means the timings are contended.
    print(
        f"load average (1 min) before/after: {load_before[0]:.2f}/{load_after[0]:.2f}; other processes' CPU "
        f"during the run: {others:.1f} CPU-s of {wall * (os.cpu_count() or 1):.1f}; wall {wall:.1f} s"
    )
    result = {
        "model_path": r["model_path"], "device": r["device"], "dtype": r["dtype"], "threads": r["threads"],
        "batch": r["batch"], "repeats": r["repeats"], "text_tokens": r["text_tokens"],
        "llm_to_vision_flops_ratio": round(ratio, 4),
        "reference_llm_to_vision_flops_ratio": round(ref, 4),
        "encode_ms_1_image": round(1e3 * r["encode_seconds"], 2),
        "prefill_ms": {str(row["keep"]): round(1e3 * row["seconds"], 2) for row in table},
        "prefill_gflop": {str(row["keep"]): round(row["flops"] / 1e9, 3) for row in table},
        "speedup": {str(row["keep"]): round(row["speedup"], 3) for row in table},
        "flops_ratio": {str(row["keep"]): round(row["flops_ratio"], 3) for row in table},
        "speedup_128": round(at128["speedup"], 3) if at128 else None,
        "flops_ratio_128": round(at128["flops_ratio"], 3) if at128 else None,
        "target_pass": verdict,
        "load_avg_1min": [round(load_before[0], 2), round(load_after[0], 2)],
        "other_processes_cpu_s": round(others, 1),
        "wall_s": round(wall, 1),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
