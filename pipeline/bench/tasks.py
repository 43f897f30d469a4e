"""Benchmark: four annotation tasks per image, asked as a task spec (encode once) against the same
questions as one row each, on the Ray job; vLLM prefix caching on and off.

    python -m pipeline.bench.tasks [--rows 24] [--families llava,qwen2_5_vl] [--engine vllm]
                                   [--prefix-caching on,off] [--ways spec,rows,text,shared]
                                   [--batch-size 4] [--caption-tokens 16] [--rows-tokens N]
                                   [--json-tokens 48] [--llava-model tiny:llava-bench]
                                   [--qwen-model tiny:qwen2_5_vl] [--shared-method divprune]
                                   [--timeout 900] [--warmup] [--smoke]

The same ``--rows`` images of the shapes world (``make_rows``, rows whose scene has a shape that
occurs once, so every task's prompt renders) are asked ``TASKS``: a caption (text), the colour of
``{shape}`` (choice), the object count (choice) and the largest object (json: colour and shape),
two ways:

- ``spec`` (encode once): one row per image, the four tasks as the job's ``tasks:``. The image is
  prepared and encoded once; ResPrune selects once per distinct noun list among the tasks; the
  decode stage sends vLLM the image's four requests side by side.
- ``rows`` (one row per question): four rows per image, ids ``<id>#<task>``, the row's ``prompt``
  the rendered question, no task spec (so answers are free text, unconstrained). Every row is
  prepared, encoded and selected on its own. Its ``generation.max_new_tokens`` is the ``spec``
  run's mean generated tokens per task (rounded up), so both generate about as many tokens per
  image; the table reports what each generated.

On vLLM a third way, ``shared``, is the task spec with a pruning method that ignores the text
(``--shared-method``, default ``divprune``, at the same budget): then all four tasks keep the same
tokens, and the image's four requests, side by side in one call, share the chat template's head
and every kept token as a prefix, the case prefix caching could pay for. ResPrune reads each
task's nouns, so ``spec`` keeps one selection per distinct noun list (``selections_per_image``).

Each family's tiny model (``tiny:llava-bench``: LLaVA-1.5's LLM-to-vision FLOP ratio; and
``tiny:qwen2_5_vl``) runs both ways with ``decode_stage.vllm.enable_prefix_caching`` on and off
(``--prefix-caching``), the ways' order reversed from one setting to the next. Config: the family's local config
(``configs/local.yaml``, ``configs/local-qwen2_5_vl.yaml``: ResPrune at its budget) with the
benchmark's 2-CPU pools (``pipeline.bench.pipeline.STAGE_CPUS``: decode a whole core). ``spec``
batches ``--batch-size`` images and ``rows`` 4x as many rows, so every vLLM call gets the same
requests, and each batch is one Parquet file (one block).

Run: ``ray.data.read_parquet`` -> ``pipeline.dataset.build_pipeline`` (stages, cost columns) ->
``iter_batches`` in the driver, as ``pipeline.bench.pipeline``. Images/s (the ratios' figure) is
the busiest stage's: images / the busy seconds of the stage whose actor worked longest (the job
summary's ``bound_by``; one actor a stage), the steady rate that stage allows, measured inside the
actors; ``busy s`` is the actor seconds an image costs, summed over the stages. Images/s from
arrivals is steady state too: images
after the second output batch / time from its arrival to the last's (actor start-up, vLLM's
included, and the pipeline's fill excluded; the first batch arrives late, bunched with the
second); end to end (start-up included) is reported too. CPU-s per image: the CPU time of our
processes (the driver, Ray's workers, vLLM's engine core) over the same window, per image: the
work an image costs, which other load on shared cores changes far less than its wall time (that
load is reported too, in cores).
FLOPs per image are the job's cost columns (``flops_total``; summed over an image's four rows in
``rows``); vision encodes per image are the rows that went through the vision tower per image.

Next to the measurement, the GPU estimate for the family's 7B config (``configs/llava-1.5-7b.yaml``,
``configs/qwen2.5-vl-7b.yaml``: its budget, accelerator and engine; ``configs/accelerators.yaml``'s
assumptions, a 1280x960 image): GPU-seconds and FLOPs per image of four tasks encoded once
(vision + 4 x (prefill + decode)) against four rows (4 x (vision + prefill + decode)), from
``pipeline.cost.planner.estimate``, each task generating ``GPU_GENERATED_TOKENS``.

A fourth way, ``text``, separates encoding once from what typed tasks change: the task spec with
every task free text at the rows' ``max_new_tokens`` (the rows' questions and lengths, encoded
once); it runs at the first ``--prefix-caching`` setting only.

The last line is ``RESULT {json}``: per family ``<family>_encode_once_over_per_row`` (steady
images/s of spec over rows, at the first ``--prefix-caching`` setting), ``..._same_decode`` (text
over rows), ``<family>_flops_per_row_over_encode_once``, ``<family>_cpu_s_per_row_over_encode_once``,
``<family>_prefix_caching_on_over_off_<way>`` (images/s) and ``..._cpu_off_over_on_<way>``,
``<family>_gpu_estimate_...``, and per run (``<family>_<way>_prefix_<on|off>``) its figures under
``runs``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from pipeline.bench.pipeline import IO_CPUS, STAGE_CPUS, deadline
from pipeline.bench.prefill import cpu_seconds, descendants, process_cpu
from pipeline.config import ConfigError, JobConfig, load_config
from pipeline.cost import planner
from pipeline.cost.accounting import accelerator_price
from pipeline.cost.prices import load_accelerators, load_prices
from pipeline.dataset import build_pipeline
from pipeline.engines import engine_environment
from pipeline.models import detect_family, model_shapes, token_counts
from pipeline.models.sources import resolve_model_path
from pipeline.plan import check_resources
from pipeline.pruning.registry import METHODS, TEXT_GUIDED
from pipeline.stages.common import limit_torch_threads
from pipeline.tiny.shapes_world import COLOURS, SCHEMA, SINGLE_WORD, make_rows

REPO = Path(__file__).resolve().parents[2]
WAYS = ("spec", "rows")  # the task spec (encode once), one row per question
TEXT = "text"  # the task spec with every task free text at the rows' length: encode once alone
SHARED = "shared"  # the task spec with a selection that ignores the text: the tasks share kept tokens
ALL_WAYS = (*WAYS, TEXT, SHARED)
FAMILIES = {  # family -> (local config, 7B cluster config)
    "llava": ("configs/local.yaml", "configs/llava-1.5-7b.yaml"),
    "qwen2_5_vl": ("configs/local-qwen2_5_vl.yaml", "configs/qwen2.5-vl-7b.yaml"),
}
GPU_IMAGE_SIZE = (1280, 960)  # the size the cluster configs are sized at (cpu_side.reference_size)
# Tokens each task generates on a 7B model, for the estimate: a short caption (the accelerator
# table's assumption), a label and its end token, and {"colour":"red","shape":"circle"} (~15 tokens).
GPU_GENERATED_TOKENS = {"caption": 32, "colour": 2, "count": 2, "object": 16}
# One object, not the list (configs/tasks/shapes.yaml's): the tiny tokenizers spell JSON a character a
# token, and an answer several times the others' length would make the spec run's decode a long tail
# that the per-row run (one max_new_tokens for every row) does not have.
OBJECT_SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": list(COLOURS)}, "shape": {"enum": ["circle", "square", "triangle"]}},
    "required": ["colour", "shape"],
}


def as_text(task_list: list[dict[str, Any]], max_new_tokens: int) -> list[dict[str, Any]]:
    """The same prompts as free text of one length: what the rows way asks, as a task spec."""
    return [{"name": t["name"], "prompt": t["prompt"], "type": "text", "max_new_tokens": max_new_tokens}
            for t in task_list]


def tasks(caption_tokens: int, json_tokens: int) -> list[dict[str, Any]]:
    """The four tasks (``JobConfig.tasks`` entries): one text, two choices, one JSON."""
    return [
        {"name": "caption", "prompt": "Describe the image.", "type": "text", "max_new_tokens": caption_tokens},
        {"name": "colour", "prompt": f"What color is the {{shape}}?{SINGLE_WORD}", "type": "choice",
         "choices": list(COLOURS)},
        {"name": "count", "prompt": f"How many shapes are in the picture?{SINGLE_WORD}", "type": "choice",
         "choices": ["1", "2", "3", "4"]},
        {"name": "object", "prompt": "Describe the largest object in the image as JSON.", "type": "json",
         "schema": OBJECT_SCHEMA, "max_new_tokens": json_tokens},
    ]


# ---------------------------------------------------------------- the corpora


def images(n: int) -> list[dict[str, Any]]:
    """``n`` shapes-world rows whose scene has a shape that occurs once (the colour task's subject)."""
    drawn = make_rows(4 * n + 16, seed=0)
    rows = [r for r in drawn if r["shape"]][:n]
    if len(rows) < n:
        raise RuntimeError(f"only {len(rows)} of {len(drawn)} drawn scenes have a shape that occurs once")
    return rows


def write_corpora(root: Path, rows: list[dict[str, Any]], task_list: list[dict[str, Any]], batch: int,
                  ) -> dict[str, Path]:
    """``root/spec``: one row per image; ``root/rows``: four rows per image (image-major, ids
    ``<id>#<task>``, the prompt rendered); one Parquet file per batch (``batch`` images)."""
    per_question = [
        {**r, "id": f"{r['id']}#{t['name']}", "prompt": t["prompt"].format(shape=r["shape"]), "expected": None,
         "question_type": t["name"]}
        for r in rows for t in task_list
    ]
    dirs = {}
    for way, table, size in (("spec", rows, batch), ("rows", per_question, batch * len(task_list))):
        out = dirs[way] = root / way
        out.mkdir(parents=True, exist_ok=True)
        # One file per batch: Ray Data reads a file as one block and does not split it at batch
        # boundaries (see pipeline.bench.pipeline.write_kind_corpora).
        for i in range(0, len(table), size):
            pq.write_table(pa.Table.from_pylist(table[i : i + size], schema=SCHEMA),
                           out / f"part-{i // size:05d}.parquet")
    return dirs


# ---------------------------------------------------------------- configs


def run_config(family: str, model: str, way: str, data_dir: Path, *, engine: str, prefix_caching: bool, batch: int,
               task_list: list[dict[str, Any]], max_new_tokens: int, method: str | None = None) -> JobConfig:
    """The family's local config on the benchmark's 2-CPU pools, one way of asking (``method``:
    another pruning method at the config's budget)."""
    n_tasks = len(task_list)
    overrides: dict[str, Any] = {**({"pruning.method": method} if method else {}),
        "input.path": str(data_dir),
        "input.create_sample_rows": None,
        "model.path": resolve_model_path(model),
        "model.device": "cpu",  # the pools reserve no GPU
        "model.dtype": "float32",
        "generation.max_new_tokens": max_new_tokens,
        "ray.num_cpus": 2,
        "ray.io_num_cpus": IO_CPUS,
        "decode_stage.engine": engine,
        "decode_stage.vllm.enable_prefix_caching": prefix_caching,
        "tasks": None if way == "rows" else as_text(task_list, max_new_tokens) if way == TEXT else task_list,
    }
    for stage, cpus in STAGE_CPUS.items():
        size = batch * n_tasks if way == "rows" else batch
        overrides |= {f"{stage}.num_cpus": cpus, f"{stage}.num_gpus": 0, f"{stage}.pool_size": 1,
                      f"{stage}.max_pool_size": None, f"{stage}.batch_size": size}
    return load_config(REPO / FAMILIES[family][0], overrides)


# ---------------------------------------------------------------- one run


def run_once(cfg: JobConfig, files: list[Path], n_tasks: int, timeout: int) -> dict[str, Any]:
    """read -> build_pipeline -> iter_batches once; per image: images/s (steady and end to end),
    FLOPs, generated tokens, vision encodes; per task errors (``spec``)."""
    check_resources(cfg, ray.cluster_resources())
    spec = bool(cfg.tasks)
    names = [t.name for t in cfg.tasks or ()]
    per_image = 1 if spec else n_tasks  # rows per image
    start = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    # CPU snapshots at the second arrival and the latest: (machine busy CPU-s, per-process CPU-s).
    window: list[tuple[float, dict[int, tuple[int, str, float]]]] = []
    rows: list[dict[str, Any]] = []
    cols = ["id", "error", "visual_tokens_in", "flops_total", "flops_vision", "flops_prefill", "flops_decode",
            "encode_ms", "prune_ms", "decode_ms", "prepare_ms"]
    cols += ([c for n in names for c in (f"{n}_error", f"{n}_generated_tokens", f"{n}_kept_indices")] if spec
             else ["generated_tokens", "prompt_tokens"])
    with deadline(timeout, f"pipeline {'spec' if spec else 'rows'}"):
        ds = ray.data.read_parquet([str(f) for f in files], num_cpus=cfg.ray.io_num_cpus,
                                   override_num_blocks=len(files))
        for block in build_pipeline(ds, cfg).iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            arrivals.append((time.perf_counter(), block.num_rows))
            if len(arrivals) >= 2:  # cheap (/proc); keeps the second arrival's and the latest
                window[1:] = [(cpu_seconds()[0], process_cpu())]
                if len(window) == 1:
                    window.append(window[0])
            rows.extend(block.select(cols).to_pylist())
    wall = time.perf_counter() - start
    failed = [r["error"] for r in rows if r["error"]]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(rows)} rows failed, e.g. {failed[0]!r}")
    n_images = len(rows) / per_image
    first_t, first_n = arrivals[0]
    steady_s = arrivals[-1][0] - first_t
    from_first = (len(rows) - first_n) / per_image / steady_s if len(arrivals) > 1 and steady_s > 0 else float("nan")
    # From the second arrival on (pipeline.bench.pipeline's variant): the first output batch waits
    # for a worker to be leased for the finalize task, so it arrives late and bunched with the
    # second; on this machine that overstated the first-to-last figure several times over.
    second_s = arrivals[-1][0] - arrivals[1][0] if len(arrivals) > 2 else float("nan")
    steady = (len(rows) - first_n - arrivals[1][1]) / per_image / second_s if second_s > 0 else float("nan")

    # Our processes' CPU-seconds (the driver, Ray's and vLLM's) in the same window, per image: the
    # work an image costs, which other load on the shared cores changes far less than its wall time.
    window_images = (len(rows) - first_n - arrivals[1][1]) / per_image if len(arrivals) > 2 else 0
    ours_s = other_s = float("nan")
    if window_images > 0:
        (busy0, p0), (busy1, p1) = window[0], window[-1]
        ours_s = sum(p1[pid][2] - (p0[pid][2] if pid in p0 else 0.0) for pid in descendants(p1, os.getpid()))
        other_s = (busy1 - busy0) - ours_s

    def per_img(col: str) -> float:
        return sum(r[col] or 0 for r in rows) / n_images

    out: dict[str, Any] = {
        "images": n_images, "rows": len(rows), "batches": len(arrivals), "wall_s": wall,
        "first_batch_s": first_t - start, "steady_s": second_s, "images_per_s": steady,
        "images_per_s_from_first_batch": from_first,
        "cpu_s_per_image": ours_s / window_images if window_images else float("nan"),
        "other_load_cores": other_s / second_s if second_s > 0 else float("nan"),  # others' CPU in the window
        "end_to_end_images_per_s": n_images / wall,
        "flops_per_image": per_img("flops_total"), "flops_vision_per_image": per_img("flops_vision"),
        "flops_prefill_per_image": per_img("flops_prefill"), "flops_decode_per_image": per_img("flops_decode"),
        # Every row went through the vision tower once (an image whose prompt failed would not).
        "vision_encodes_per_image": sum(1 for r in rows if r["visual_tokens_in"]) / n_images,
        "encode_busy_s": sum(r["encode_ms"] + r["prune_ms"] for r in rows) / 1e3,
        "decode_busy_s": sum(r["decode_ms"] for r in rows) / 1e3,
        "prepare_busy_s": sum(r["prepare_ms"] for r in rows) / 1e3,
    }
    # The job summary's view: each stage's actor busy time (its rows' stage times); with one actor
    # a stage, the busiest one bounds the steady rate (images / its busy seconds), and the sum is
    # the actor time an image costs. Both come from inside the actors, so they do not carry the
    # arrival jitter that makes the steady window noisy when a run lasts a few seconds.
    busiest = max(out["prepare_busy_s"], out["encode_busy_s"], out["decode_busy_s"])
    out["bound_images_per_s"] = n_images / busiest if busiest > 0 else float("nan")
    out["busy_s_per_image"] = (out["prepare_busy_s"] + out["encode_busy_s"] + out["decode_busy_s"]) / n_images
    if spec:
        errors = {n: [r[f"{n}_error"] for r in rows if r[f"{n}_error"]] for n in names}
        out["task_errors"] = {n: len(e) for n, e in errors.items()}
        out["first_task_error"] = next((f"{n}: {e[0]}" for n, e in errors.items() if e), None)
        out["generated_per_task"] = {n: statistics.fmean(r[f"{n}_generated_tokens"] or 0 for r in rows) for n in names}
        out["generated_tokens_per_image"] = sum(out["generated_per_task"].values())
        # Distinct selections per image: tasks with the same kept tokens can share a cached prefix.
        out["selections_per_image"] = statistics.fmean(
            len({tuple(r[f"{n}_kept_indices"]) for n in names if r[f"{n}_kept_indices"] is not None}) for r in rows)
    else:
        out["generated_tokens_per_image"] = per_img("generated_tokens")
        out["selections_per_image"] = float(per_image)
    return out


# ---------------------------------------------------------------- the GPU estimate


def gpu_estimate(family: str, generated: dict[str, int]) -> dict[str, Any]:
    """The planner's per-image estimate for the family's 7B config at its budget, accelerator and
    engine, with the accelerator table's assumptions (text tokens per task), each task generating
    ``generated[task]`` tokens: the tasks encoded once (vision + the tasks' prefill and decode)
    against one row each (each row its own vision encode too)."""
    cfg = load_config(REPO / FAMILIES[family][1])
    arch = str(REPO / cfg.model.architecture)
    table = load_accelerators(REPO / "configs" / "accelerators.yaml")
    name = cfg.cost.accelerator
    accelerator, assume = table.accelerators[name], table.assumptions
    n_visual, patches = token_counts(arch, cfg.model, *GPU_IMAGE_SIZE, family)
    keep = cfg.pruning.keep_for(n_visual)
    shapes, price = model_shapes(arch, family), accelerator_price(load_prices(cfg.cost.prices), name)
    rows = [planner.estimate(
        shapes, model=planner.model_label(cfg.model.path), method=cfg.pruning.method, keep=keep,
        visual_tokens_in=n_visual, encoder_patches=patches, accelerator_name=name, accelerator=accelerator,
        price=price, assume=assume.model_copy(update={"generated_tokens": g}), images=1, gpus=1,
        engine=cfg.decode_stage.engine, max_new_tokens=cfg.generation.max_new_tokens,
    ) for g in generated.values()]
    vision_s = rows[0].flops_vision_per_image / (accelerator.bf16_flops * assume.vision_mfu)  # the same for every task
    f_vision = rows[0].flops_vision_per_image
    once_s = vision_s + sum(r.gpu_seconds_per_image - vision_s for r in rows)
    rows_s = sum(r.gpu_seconds_per_image for r in rows)
    once_f = f_vision + sum(r.flops_per_image - f_vision for r in rows)
    rows_f = sum(r.flops_per_image for r in rows)
    return {
        "config": FAMILIES[family][1], "accelerator": name, "engine": cfg.decode_stage.engine,
        "image_size": "x".join(map(str, GPU_IMAGE_SIZE)), "visual_tokens": n_visual, "keep": keep,
        "text_tokens_per_task": assume.text_tokens, "generated_tokens": generated,
        "vision_share_encode_once": vision_s / once_s,
        "encode_once_images_per_s": 1 / once_s, "per_row_images_per_s": 1 / rows_s,
        "encode_once_over_per_row": rows_s / once_s,
        "flops_encode_once": once_f, "flops_per_row": rows_f, "flops_per_row_over_encode_once": rows_f / once_f,
    }


# ---------------------------------------------------------------- the run


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, digits)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b and not (math.isnan(a) or math.isnan(b)) else None


def _prefix(text: str) -> list[bool]:
    values = {"on": True, "off": False}
    out = [values.get(x.strip()) for x in text.split(",") if x.strip()]
    if not out or None in out:
        raise argparse.ArgumentTypeError(f"--prefix-caching is on, off or on,off; got {text!r}")
    return list(dict.fromkeys(out))  # type: ignore[arg-type]


def _families(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    if not out or set(out) - set(FAMILIES):
        raise argparse.ArgumentTypeError(f"families are some of {', '.join(FAMILIES)}; got {text!r}")
    return list(dict.fromkeys(out))


def _ways(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    if not out or set(out) - set(ALL_WAYS):
        raise argparse.ArgumentTypeError(f"ways are some of {', '.join(ALL_WAYS)}; got {text!r}")
    return [w for w in ALL_WAYS if w in out]  # spec first: the rows' length is read from it


def run_name(family: str, way: str, prefix: bool) -> str:
    return f"{family}_{way}_prefix_{'on' if prefix else 'off'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=24, help="images (the rows way has 4x as many rows)")
    parser.add_argument("--families", type=_families, default=list(FAMILIES), help="llava,qwen2_5_vl or one")
    parser.add_argument("--llava-model", default="tiny:llava-bench")
    parser.add_argument("--qwen-model", default="tiny:qwen2_5_vl")
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm", help="decode engine (hf: no prefix cache)")
    parser.add_argument("--prefix-caching", type=_prefix, default=[True, False],
                        help="vLLM's enable_prefix_caching: on, off or on,off (default)")
    parser.add_argument("--ways", type=_ways, default=list(ALL_WAYS),
                        help="which of spec,rows,text,shared to run (default all; shared needs vllm)")
    parser.add_argument("--shared-method", default="divprune",
                        help="the shared way's pruning method: one that ignores the text, at the config's budget (all "
                        "tasks share the kept tokens, so their requests share a prefix)")
    parser.add_argument("--rows-tokens", type=int, default=None,
                        help="max_new_tokens of the rows and text ways (default: the spec run's mean generated "
                        "tokens per task, rounded up; without a spec run, --caption-tokens)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per batch (rows: 4x as many rows)")
    parser.add_argument("--caption-tokens", type=int, default=16, help="the caption task's max_new_tokens")
    parser.add_argument("--json-tokens", type=int, default=48,
                        help="the object task's max_new_tokens (its longest answer is 38 tokens)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per pipeline run")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=False,
                        help="one untimed spec run on one file first (the first run after ray.init starts slowly; "
                        "the steady figures exclude start-up, so off by default: it costs a vLLM start)")
    parser.add_argument("--smoke", action="store_true",
                        help="a quick run for tests: 3 images, one a batch, tiny:llava alone, hf, 2-token captions")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.batch_size, args.llava_model, args.engine = 3, 1, "tiny:llava", "hf"
        args.families, args.caption_tokens, args.warmup, args.timeout = ["llava"], 2, False, 240
    if args.engine == "hf":
        args.prefix_caching = [False]  # no prefix cache: one run per way, and no shared way
        args.ways = [w for w in args.ways if w != SHARED]
    if args.shared_method not in METHODS or args.shared_method in TEXT_GUIDED:
        parser.error(f"--shared-method must be a pruning method that ignores the text, not {args.shared_method!r}")
    if min(args.rows, args.batch_size, args.caption_tokens, args.json_tokens) < 1:
        parser.error("--rows, --batch-size, --caption-tokens and --json-tokens must be >= 1")
    models = {"llava": args.llava_model, "qwen2_5_vl": args.qwen_model}
    task_list = tasks(args.caption_tokens, args.json_tokens)
    n_tasks = len(task_list)

    load_before = os.getloadavg()
    t_all = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="resprune-bench-tasks-")
    dirs = write_corpora(Path(tmp.name), images(args.rows), task_list, args.batch_size)
    files = {way: sorted(d.glob("*.parquet")) for way, d in dirs.items()}
    notes: list[str] = []
    for family in args.families:
        path = resolve_model_path(models[family])
        if detect_family(path) != family:
            parser.error(f"--{'llava' if family == 'llava' else 'qwen'}-model {models[family]} is not a {family} model")
    try:
        env = engine_environment(run_config(args.families[0], models[args.families[0]], "spec", dirs["spec"],
                                            engine=args.engine, prefix_caching=True, batch=args.batch_size,
                                            task_list=task_list, max_new_tokens=8).decode_stage).as_dict()
    except ConfigError as e:
        parser.error(f"engine {args.engine} cannot run here: {e}")
    print(f"images={args.rows} tasks={[t['name'] for t in task_list]} engine={args.engine} ({env['package']} "
          f"{env['version']}) batch: {args.batch_size} images (spec) / {args.batch_size * n_tasks} rows (rows); "
          f"caption {args.caption_tokens} tokens, object json {args.json_tokens}; pools {STAGE_CPUS} io {IO_CPUS}")

    runs: dict[str, dict[str, Any]] = {}
    limit_torch_threads(1)  # the driver only consumes batches
    gc.collect()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.use_datasource_v2 = False  # as pipeline.dataset: the V2 reader deadlocks on 2 CPUs
        ctx.enable_progress_bars = False
        if args.warmup:
            family = args.families[0]
            cfg = run_config(family, models[family], "spec", dirs["spec"], engine=args.engine, prefix_caching=True,
                             batch=args.batch_size, task_list=task_list, max_new_tokens=8)
            print(f"warm-up: {family} spec on one file", flush=True)
            run_once(cfg, files["spec"][:1], n_tasks, args.timeout)
        ways = args.ways
        for family in args.families:
            for i, prefix in enumerate(args.prefix_caching):
                # The ways alternate in order from one prefix setting to the next; spec runs first
                # (rows' max_new_tokens is read from it).
                for way in ways if i % 2 == 0 else ways[::-1]:
                    if way == TEXT and i > 0:
                        continue  # like for like with rows at the main setting; prefix caching is the others'
                    spec_done = [r for n, r in runs.items() if n.startswith(f"{family}_spec_")]
                    spec_tokens = [r["generated_tokens_per_image"] for r in spec_done]
                    per_task = args.rows_tokens or (math.ceil(statistics.fmean(spec_tokens) / n_tasks) if spec_done
                                                    else args.caption_tokens)
                    free = way in ("rows", TEXT)  # free text of one length: the rows' questions
                    cfg = run_config(family, models[family], way, dirs["rows" if way == "rows" else "spec"],
                                     engine=args.engine, prefix_caching=prefix, batch=args.batch_size,
                                     task_list=task_list, max_new_tokens=per_task if free else 8,
                                     method=args.shared_method if way == SHARED else None)
                    name = run_name(family, way, prefix)
                    print(f"running {name} ({cfg.pruning.method}; max_new_tokens "
                          f"{per_task if free else 'per task'})", flush=True)
                    try:
                        r = run_once(cfg, files["rows" if way == "rows" else "spec"], n_tasks, args.timeout)
                    except Exception as e:  # noqa: BLE001 - reported; the other runs go on
                        notes.append(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")
                        print(f"  {notes[-1]}", flush=True)
                        continue
                    r["max_new_tokens"] = per_task if free else None
                    r["method"] = cfg.pruning.method
                    runs[name] = r
                    if r.get("first_task_error"):
                        notes.append(f"{name}: task errors {r['task_errors']}, e.g. {r['first_task_error'][:200]}")
                    print(f"  {r['bound_images_per_s']:.3f} img/s at the busiest stage, {r['images_per_s']:.3f} from "
                          f"arrivals ({r['cpu_s_per_image']:.3f} CPU-s/image, others "
                          f"{r['other_load_cores']:.2f} cores), {r['end_to_end_images_per_s']:.3f} end to end "
                          f"({r['wall_s']:.1f} s), {r['flops_per_image'] / 1e9:.1f} GFLOP/image, "
                          f"{r['generated_tokens_per_image']:.1f} generated tokens/image, "
                          f"{r['selections_per_image']:.2f} selections/image; busy s per image: prepare "
                          f"{r['prepare_busy_s'] / r['images']:.3f}, encode {r['encode_busy_s'] / r['images']:.3f}, "
                          f"decode {r['decode_busy_s'] / r['images']:.3f}", flush=True)
    finally:
        ray.shutdown()
    tmp.cleanup()

    estimates = {}
    for family in args.families:
        try:
            estimates[family] = gpu_estimate(family, GPU_GENERATED_TOKENS)
        except (OSError, ValueError, KeyError) as e:
            notes.append(f"{family} GPU estimate: {type(e).__name__}: {e}")

    print(f"\n{'run':<28} {'bound':>6} {'busy s':>6} {'img/s':>7} {'CPU-s/img':>9} {'others':>6} {'e2e img/s':>9} "
          f"{'GFLOP/img':>9} {'vision':>7} {'encodes':>7} {'selections':>10} {'gen tok/img':>11} {'wall s':>7}")
    for name, r in runs.items():
        print(f"{name:<28} {r['bound_images_per_s']:>6.2f} {r['busy_s_per_image']:>6.3f} "
              f"{r['images_per_s']:>7.3f} {r['cpu_s_per_image']:>9.3f} {r['other_load_cores']:>6.2f} "
              f"{r['end_to_end_images_per_s']:>9.3f} "
              f"{r['flops_per_image'] / 1e9:>9.2f} {r['flops_vision_per_image'] / 1e9:>7.2f} "
              f"{r['vision_encodes_per_image']:>7.1f} {r['selections_per_image']:>10.2f} "
              f"{r['generated_tokens_per_image']:>11.1f} {r['wall_s']:>7.1f}")

    result: dict[str, Any] = {"images": args.rows, "tasks": [t["name"] for t in task_list], "engine": args.engine,
                              "engine_env": env, "models": {f: models[f] for f in args.families},
                              "batch_size": args.batch_size, "prefix_caching_runs": args.prefix_caching}
    for family in args.families:
        def run(way: str, prefix: bool, family: str = family) -> dict[str, Any]:
            return runs.get(run_name(family, way, prefix), {})

        main_prefix = args.prefix_caching[0]
        a, b = run("spec", main_prefix), run("rows", main_prefix)
        result[f"{family}_encode_once_over_per_row"] = _ratio(a.get("bound_images_per_s"), b.get("bound_images_per_s"))
        result[f"{family}_encode_once_over_per_row_arrivals"] = _ratio(a.get("images_per_s"), b.get("images_per_s"))
        result[f"{family}_busy_s_per_row_over_encode_once"] = _ratio(b.get("busy_s_per_image"),
                                                                    a.get("busy_s_per_image"))
        result[f"{family}_encode_once_over_per_row_end_to_end"] = _ratio(a.get("end_to_end_images_per_s"),
                                                                        b.get("end_to_end_images_per_s"))
        result[f"{family}_flops_per_row_over_encode_once"] = _ratio(b.get("flops_per_image"), a.get("flops_per_image"))
        result[f"{family}_cpu_s_per_row_over_encode_once"] = _ratio(b.get("cpu_s_per_image"), a.get("cpu_s_per_image"))
        # Like for like: the same free-text questions at the same length, encoded once or per row.
        t = run(TEXT, main_prefix)
        result[f"{family}_encode_once_over_per_row_same_decode"] = _ratio(t.get("bound_images_per_s"),
                                                                         b.get("bound_images_per_s"))
        result[f"{family}_busy_s_per_row_over_encode_once_same_decode"] = _ratio(b.get("busy_s_per_image"),
                                                                                t.get("busy_s_per_image"))
        result[f"{family}_cpu_s_per_row_over_encode_once_same_decode"] = _ratio(b.get("cpu_s_per_image"),
                                                                               t.get("cpu_s_per_image"))
        result[f"{family}_flops_per_row_over_encode_once_same_decode"] = _ratio(b.get("flops_per_image"),
                                                                               t.get("flops_per_image"))
        result[f"{family}_generated_tokens_per_image"] = {
            w: _round(run(w, main_prefix).get("generated_tokens_per_image"), 2) for w in ALL_WAYS}
        for way in ALL_WAYS:
            result[f"{family}_prefix_caching_on_over_off_{way}"] = _ratio(
                run(way, True).get("bound_images_per_s"), run(way, False).get("bound_images_per_s"))
            # Decode busy seconds off / on: above 1, prefix caching saved decode time.
            result[f"{family}_prefix_caching_decode_off_over_on_{way}"] = _ratio(
                run(way, False).get("decode_busy_s"), run(way, True).get("decode_busy_s"))
        est = estimates.get(family)
        result[f"{family}_gpu_estimate_encode_once_over_per_row"] = (
            _round(est["encode_once_over_per_row"], 3) if est else None)
        result[f"{family}_gpu_estimate_flops_per_row_over_encode_once"] = (
            _round(est["flops_per_row_over_encode_once"], 3) if est else None)
        print(f"{family}: encode once / one row per question, images/s (busiest stage, prefix caching "
              f"{'on' if main_prefix else 'off'}): {result[f'{family}_encode_once_over_per_row']} "
              f"(arrivals {result[f'{family}_encode_once_over_per_row_arrivals']}, end to end "
              f"{result[f'{family}_encode_once_over_per_row_end_to_end']}); actor busy s per image rows / spec "
              f"{result[f'{family}_busy_s_per_row_over_encode_once']}; FLOPs per image rows / spec: "
              f"{result[f'{family}_flops_per_row_over_encode_once']}; CPU-s per image rows / spec "
              f"{result[f'{family}_cpu_s_per_row_over_encode_once']}; generated tokens per image "
              f"{result[f'{family}_generated_tokens_per_image']}")
        print(f"{family}: the same free-text questions at one length (text way) / rows: images/s "
              f"{result[f'{family}_encode_once_over_per_row_same_decode']}, actor busy s per image rows / text "
              f"{result[f'{family}_busy_s_per_row_over_encode_once_same_decode']}, CPU-s per image rows / text "
              f"{result[f'{family}_cpu_s_per_row_over_encode_once_same_decode']}, FLOPs per image rows / text "
              f"{result[f'{family}_flops_per_row_over_encode_once_same_decode']}")
        if args.engine == "vllm":
            print(f"{family}: prefix caching on / off, images/s (busiest stage): spec "
                  f"{result[f'{family}_prefix_caching_on_over_off_spec']}, "
                  f"rows {result[f'{family}_prefix_caching_on_over_off_rows']}, "
                  f"text {result[f'{family}_prefix_caching_on_over_off_text']}, spec with {args.shared_method} "
                  f"(shared kept tokens) {result[f'{family}_prefix_caching_on_over_off_shared']}")
        if est:
            print(f"{family}: GPU estimate ({est['config']}, {est['accelerator']}, {est['engine']}, "
                  f"{est['image_size']}: {est['visual_tokens']} visual tokens, keep {est['keep']}, "
                  f"{est['text_tokens_per_task']} text tokens a task, generated {est['generated_tokens']}; vision "
                  f"{100 * est['vision_share_encode_once']:.0f}% of the encode-once GPU time): encode once / per row "
                  f"images/s {est['encode_once_over_per_row']:.3f}, FLOPs per row / encode once "
                  f"{est['flops_per_row_over_encode_once']:.3f}")
    result["runs"] = {n: {k: (_round(v) if isinstance(v, float) else v) for k, v in r.items()} for n, r in runs.items()}
    result["gpu_estimate"] = {f: {k: (_round(v, 6) if isinstance(v, float) else v) for k, v in e.items()}
                              for f, e in estimates.items()}
    for note in notes:
        print(f"note: {note}")
    wall = time.perf_counter() - t_all
    load_after = os.getloadavg()
    print(f"load average (1 min) before/after: {load_before[0]:.2f}/{load_after[0]:.2f}; wall {wall:.1f} s")
    result |= {"notes": notes, "load_avg_1min": [round(load_before[0], 2), round(load_after[0], 2)],
               "wall_s": round(wall, 1), "date": time.strftime("%Y-%m-%d")}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
