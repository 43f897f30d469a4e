"""Benchmark: the Ray job's images/s on ``tiny:llava-bench``, ResPrune keep 128 vs keep-all.

    python -m pipeline.bench.pipeline [--rows 48] [--batch-size 8] [--max-new-tokens 8]
                                      [--config configs/local.yaml] [--timeout 600]

Same data (the synthetic sample corpus, one Parquet file per batch) through the real pipeline
twice: ``resprune`` keeping 128 of 576 visual tokens, and ``none`` keeping all 576. Config:
``configs/local.yaml`` with the model set to the resolved ``tiny:llava-bench`` directory, every
stage's batch size set to ``--batch-size`` (text included) and the pools sized for 2 CPUs with
the decode stage (the bottleneck) given the most: text 0.25, encode 0.5, decode 1.0, io 0.25.

Pipeline figure: ``ray.data.read_parquet`` (one block per file) -> ``pipeline.job.build_pipeline``
consumed with ``iter_batches`` in the driver, after one untimed warm-up run on one file.
Steady-state images/s = rows after the first batch / time from the first batch's arrival to the
last's (actor start-up and pipeline fill excluded); the same from the second batch (immune to a
late first batch), the end-to-end wall time (actor start-up included), the decode actor's busy
share of the window and the CPU-seconds per process in it are reported too.

Each stage alone: ``TextStage``, ``EncodeStage``, ``DecodeStage`` instantiated in this process
with the same stage configs and torch threads an actor would get, fed the same rows in batches
of the stage's batch size (one untimed warm-up batch first); images/s = rows / total time.

Targets (printed, not enforced; exit status 0 unless a run fails or times out):
  pruned_images_per_s / keep_all_images_per_s >= 2
  pruned_images_per_s / slowest_stage_images_per_s (pruned config) >= 0.8
The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data

from pipeline.bench.prefill import cpu_seconds, descendants, process_cpu
from pipeline.config import JobConfig, load_config
from pipeline.io.sample_corpus import write_corpus
from pipeline.job import build_pipeline, check_resources
from pipeline.models.sources import resolve_model_path
from pipeline.stages.common import Batch, limit_torch_threads
from pipeline.stages.decode import DecodeStage
from pipeline.stages.encode import EncodeStage
from pipeline.stages.text import TextStage

REPO = Path(__file__).resolve().parents[2]
# CPUs per actor on a 2-CPU machine: decode is the bottleneck, so it gets a whole core (one
# torch thread); encode half a core (still one thread); text and the read/finalize tasks a
# quarter each. 0.25 + 0.5 + 1.0 + 0.25 = 2.0, so every pool and one io task fit at once.
STAGE_CPUS = {"text_stage": 0.25, "encode_stage": 0.5, "decode_stage": 1.0}
IO_CPUS = 0.25
TARGET_PRUNE_SPEEDUP = 2.0
TARGET_PIPELINE_EFFICIENCY = 0.8
# With one decode actor, a clean run keeps it busy ~100-110% of the first-to-last-arrival window
# (the second batch starts just before the first arrives); more means outputs arrived bunched.
BUNCHED = 1.25


def bench_config(
    config: Path, data_dir: Path, method: str, keep: int, batch_size: int, max_new_tokens: int,
    model_path: str = "tiny:llava-bench",
) -> JobConfig:
    """``config`` with the bench model, method/keep, and the 2-CPU pool sizes."""
    overrides: dict[str, Any] = {
        "input.path": str(data_dir),
        "input.create_sample_rows": None,
        "model.path": resolve_model_path(model_path),
        "model.family": "llava",
        "model.device": "cpu",  # the pools reserve no GPU; in-process stages must match them
        "model.dtype": "float32",
        "pruning.method": method,
        "pruning.keep": keep,
        "generation.max_new_tokens": max_new_tokens,
        "ray.num_cpus": 2,
        "ray.io_num_cpus": IO_CPUS,
    }
    for stage, cpus in STAGE_CPUS.items():
        overrides |= {
            f"{stage}.num_cpus": cpus, f"{stage}.num_gpus": 0, f"{stage}.pool_size": 1,
            f"{stage}.max_pool_size": None,  # fixed pools: an autoscaled actor would not fit in 2 CPUs
            # The text stage too (local.yaml: 64): Ray bundles input blocks up to a stage's batch
            # size and emits one block per bundle, so a 64-row text batch would hand encode and then
            # decode all 48 rows as one block and the stages would run one after the other.
            f"{stage}.batch_size": batch_size,
        }
    return load_config(config, overrides)


@contextlib.contextmanager
def deadline(seconds: int, what: str) -> Iterator[None]:
    """Raise TimeoutError in the main thread after ``seconds`` (Ray's blocking waits check signals)."""

    def _expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"{what} did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- each stage alone, in process


def _to_batch(table: Any) -> Batch:
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def _concat(batches: list[Batch]) -> Batch:
    out: Batch = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        out[key] = np.concatenate(parts) if isinstance(parts[0], np.ndarray) else [v for p in parts for v in p]
    return out


def _split(batch: Batch, size: int) -> list[Batch]:
    n = len(batch["id"])
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def _run_stage(stage: Any, batches: list[Batch], num_cpus: float) -> tuple[Batch, float, float]:
    """One untimed warm-up call on a copy of the first batch, then every batch, timed in total.
    Returns the output, the seconds, and the CPU-seconds other processes took meanwhile."""
    limit_torch_threads(num_cpus)  # what the actor does; set again because stages share this process
    stage(dict(batches[0]))
    busy0, start = cpu_seconds()
    own0 = time.process_time()
    outputs = [stage(b) for b in batches]
    busy1, end = cpu_seconds()
    return _concat(outputs), end - start, (busy1 - busy0) - (time.process_time() - own0)


def time_stages(cfg: JobConfig, data_dir: Path) -> dict[str, dict[str, float]]:
    """Images/s of each stage run alone on all rows, with the pipeline's stage configs."""
    batch = _to_batch(pq.read_table(data_dir))
    rows = len(batch["id"])
    figures: dict[str, dict[str, float]] = {}
    stages = [
        ("text", lambda: TextStage(cfg.text_stage), cfg.text_stage),
        ("encode", lambda: EncodeStage(cfg.model, cfg.pruning, cfg.input, cfg.encode_stage), cfg.encode_stage),
        ("decode", lambda: DecodeStage(cfg.model, cfg.generation, cfg.decode_stage), cfg.decode_stage),
    ]
    for name, make, stage_cfg in stages:
        limit_torch_threads(stage_cfg.num_cpus)
        stage = make()
        batch, seconds, others = _run_stage(stage, _split(batch, stage_cfg.batch_size), stage_cfg.num_cpus)
        del stage
        gc.collect()
        figures[name] = {"seconds": seconds, "images_per_s": rows / seconds, "other_cpu_s": others}
    errors = [e for e in batch["error"] if e]
    if errors:
        raise RuntimeError(f"{len(errors)} rows failed in the stage run, e.g. {errors[0]!r}")
    return figures


# ---------------------------------------------------------------- the Ray Data pipeline


def run_pipeline(cfg: JobConfig, files: list[Path], timeout: int) -> dict[str, Any]:
    """Run read -> build_pipeline -> iter_batches once; arrival times of every output batch and
    where the CPU went between the first arrival and the last."""
    check_resources(cfg, ray.cluster_resources())
    busy0, wall0 = cpu_seconds()
    start = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    window: list[tuple[tuple[float, float], dict[int, tuple[int, str, float]]]] = []  # first / last arrival
    columns: dict[str, list] = {c: [] for c in ("error", "decode_ms", "encode_ms", "prune_ms", "text_ms",
                                               "visual_tokens_kept", "prompt_tokens", "generated_tokens")}
    with deadline(timeout, f"pipeline {cfg.pruning.method}/{cfg.pruning.keep}"):
        # One block per file: Ray would otherwise merge small files into fewer, larger read
        # tasks, and a block larger than a batch holds the next stage back until all of it is done.
        ds = ray.data.read_parquet(
            [str(f) for f in files], num_cpus=cfg.ray.io_num_cpus, override_num_blocks=len(files)
        )
        ds = build_pipeline(ds, cfg)
        # prefetch_batches=0: with Ray's default of 1 a batch is handed over only once the next
        # one is ready too, so arrival times lag one batch and the last two arrive together.
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            arrivals.append((time.perf_counter(), block.num_rows))
            window[1:] = [(cpu_seconds(), process_cpu())]  # cheap (/proc); keeps first and latest
            if len(window) == 1:
                window.append(window[0])
            for c, values in columns.items():
                values.extend(block.column(c).to_pylist())
    end = time.perf_counter()
    busy1, wall1 = cpu_seconds()
    rows = sum(n for _, n in arrivals)
    errors = [e for e in columns["error"] if e]
    if errors:
        raise RuntimeError(f"{len(errors)} of {rows} rows failed in the pipeline, e.g. {errors[0]!r}")
    first_t, first_n = arrivals[0]
    steady_s = arrivals[-1][0] - first_t
    steady = (rows - first_n) / steady_s if len(arrivals) > 1 and steady_s > 0 else float("nan")
    # The same from the second arrival: the first output batch waits for a fresh worker to be
    # leased for the finalize task (~1-2 s on this machine), so the first arrival is late and
    # the first-to-last window is short by that much. This variant does not carry that bias.
    second_s = arrivals[-1][0] - arrivals[1][0] if len(arrivals) > 2 else float("nan")
    from_second = (rows - first_n - arrivals[1][1]) / second_s if second_s > 0 else float("nan")
    # Busy time of each stage's actor while the driver was receiving batches 2..n: rows of the
    # first batch are skipped (they were processed before the window opened).
    later = slice(first_n, rows)

    def busy(*cols: str) -> float:
        return sum(sum(columns[c][later]) for c in cols) / 1e3

    # CPU-seconds per process title over the steady window: our Ray processes by name, the rest
    # (other users of the machine) as one figure.
    ((b0, _), p0), ((b1, _), p1) = window[0], window[-1]
    ours = descendants(p1, os.getpid())
    by_title: dict[str, float] = {}
    for pid in ours:
        _, title, cpu = p1[pid]
        title = "driver" if pid == os.getpid() else title if title.startswith("ray::") else os.path.basename(title)
        by_title[title] = by_title.get(title, 0.0) + cpu - (p0[pid][2] if pid in p0 else 0.0)
    window_cpu = {t: round(c, 2) for t, c in sorted(by_title.items(), key=lambda x: -x[1]) if c >= 0.05}
    # Everything else the machine did: other users' processes, and ours that exited meanwhile.
    window_cpu["(other processes)"] = round((b1 - b0) - sum(by_title.values()), 2)

    return {
        "rows": rows,
        "batches": len(arrivals),
        "arrivals_s": [round(t - start, 2) for t, _ in arrivals],
        "first_batch_s": first_t - start,
        "wall_s": end - start,
        "steady_s": steady_s,
        "images_per_s": steady,
        "images_per_s_from_second": from_second,
        "end_to_end_images_per_s": rows / (end - start),
        "decode_utilisation": busy("decode_ms") / steady_s if steady_s > 0 else float("nan"),
        "encode_utilisation": busy("encode_ms", "prune_ms") / steady_s if steady_s > 0 else float("nan"),
        # Per-batch work rate inside the pipeline (busy time only): compare with the stage alone.
        "decode_images_per_busy_s": rows / (sum(columns["decode_ms"]) / 1e3),
        "encode_images_per_busy_s": rows / (sum(columns["encode_ms"] + columns["prune_ms"]) / 1e3),
        "mean_visual_tokens_kept": statistics.fmean(columns["visual_tokens_kept"]),
        "mean_prompt_tokens": statistics.fmean(columns["prompt_tokens"]),
        "mean_generated_tokens": statistics.fmean(columns["generated_tokens"]),
        "machine_cpu_busy": (busy1 - busy0) / ((wall1 - wall0) * (os.cpu_count() or 1)),
        "window_cpu_s": window_cpu,
        "stats": ds.stats(),
    }


def _print_pipeline(name: str, r: dict[str, Any]) -> None:
    print(
        f"  {name:<9} {r['images_per_s']:>7.3f} img/s steady ({r['rows']} rows in {r['batches']} batches; "
        f"first batch at {r['first_batch_s']:.1f} s, last at {r['first_batch_s'] + r['steady_s']:.1f} s; "
        f"{r['images_per_s_from_second']:.3f} img/s from the second batch), "
        f"end-to-end {r['wall_s']:.1f} s = {r['end_to_end_images_per_s']:.3f} img/s"
    )
    print(
        f"  {'':<9} decode actor busy {100 * r['decode_utilisation']:.0f}% of the steady window, "
        f"encode {100 * r['encode_utilisation']:.0f}%; in-pipeline rates while busy: decode "
        f"{r['decode_images_per_busy_s']:.3f} img/s, encode {r['encode_images_per_busy_s']:.3f} img/s; "
        f"machine CPU busy {100 * r['machine_cpu_busy']:.0f}%; tokens kept {r['mean_visual_tokens_kept']:.0f}, "
        f"prompt {r['mean_prompt_tokens']:.0f}, generated {r['mean_generated_tokens']:.1f}"
    )
    print(f"  {'':<9} batch arrivals (s after start): {r['arrivals_s']}")
    print(f"  {'':<9} CPU-s in the steady window ({r['steady_s']:.1f} s x {os.cpu_count()} cores): {r['window_cpu_s']}")
    if r["decode_utilisation"] > BUNCHED:
        print(
            f"  {'':<9} WARNING: the decode actor worked {100 * r['decode_utilisation']:.0f}% of the window: the first "
            "batch reached the driver late (outputs bunched), so the steady figure overstates throughput; "
            "the from-second-batch figure is the better estimate for this run"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48, help="sample-corpus rows")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per call, every stage")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--keep", type=int, default=128, help="ResPrune budget (of 576)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "local.yaml")
    parser.add_argument("--model-path", default="tiny:llava-bench")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a fresh temp dir")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per pipeline / stage run")
    parser.add_argument("--stats", action="store_true", help="print ds.stats() of both pipeline runs")
    args = parser.parse_args()

    load_before = os.getloadavg()
    t_all = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="resprune-bench-")
    data_dir = args.data_dir or Path(tmp.name) / "corpus"
    if not (data_dir.exists() and any(data_dir.glob("*.parquet"))):
        # One file per batch, as a real corpus has many files: Ray Data's map operators do not
        # split their output blocks at batch boundaries, so a block larger than a batch would
        # make the next stage wait for all of it and the stages would run one after the other.
        write_corpus(data_dir, rows=args.rows, shards=max(1, math.ceil(args.rows / args.batch_size)))
    n_rows = sum(pq.read_metadata(f).num_rows for f in data_dir.glob("*.parquet"))
    configs = {
        "pruned": bench_config(args.config, data_dir, "resprune", args.keep, args.batch_size, args.max_new_tokens,
                               args.model_path),
        "keep_all": bench_config(args.config, data_dir, "none", 576, args.batch_size, args.max_new_tokens,
                                 args.model_path),
    }
    cfg = configs["pruned"]
    print(
        f"model={cfg.model.path} rows={n_rows} files={len(list(data_dir.glob('*.parquet')))} "
        f"batch_size={args.batch_size} max_new_tokens={cfg.generation.max_new_tokens} "
        f"cpus: text {cfg.text_stage.num_cpus} encode {cfg.encode_stage.num_cpus} decode {cfg.decode_stage.num_cpus} "
        f"io {cfg.ray.io_num_cpus} (ray.num_cpus={cfg.ray.num_cpus}); pruned = resprune keep {args.keep}, "
        f"keep-all = none keep 576"
    )

    # Stages alone first, before Ray starts: nothing else competes for the cores.
    stages: dict[str, dict[str, dict[str, float]]] = {}
    for name, c in configs.items():
        with deadline(args.timeout, f"stages alone ({name})"):
            stages[name] = time_stages(c, data_dir)
    limit_torch_threads(1)  # the driver only consumes batches from here on
    gc.collect()

    ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False)  # as pipeline.job._init_ray
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.use_datasource_v2 = False  # as pipeline.job: the V2 reader deadlocks on 2 CPUs
        ctx.enable_progress_bars = False
        files = sorted(data_dir.glob("*.parquet"))
        # Untimed warm-up on one file: the first pipeline after ray.init competes with Ray's
        # prestarted workers importing torch, which delays and bunches its early batches.
        run_pipeline(configs["pruned"], files[:1], args.timeout)
        pipelines = {name: run_pipeline(c, files, args.timeout) for name, c in configs.items()}
    finally:
        ray.shutdown()

    print("each stage alone (in process, same stage configs and torch threads), images/s:")
    print(f"  {'config':<9} {'text':>8} {'encode':>8} {'decode':>8}   slowest   other processes' CPU-s (text/encode/decode)")
    for name, s in stages.items():
        slowest = min(s, key=lambda k: s[k]["images_per_s"])
        others = "/".join(f"{s[k]['other_cpu_s']:.1f}" for k in ("text", "encode", "decode"))
        print(
            f"  {name:<9} {s['text']['images_per_s']:>8.2f} {s['encode']['images_per_s']:>8.3f} "
            f"{s['decode']['images_per_s']:>8.3f}   {slowest:<8}  {others}"
        )
    print("Ray Data pipeline (read_parquet -> build_pipeline -> iter_batches):")
    for name, r in pipelines.items():
        _print_pipeline(name, r)
    if args.stats:
        for name, r in pipelines.items():
            print(f"--- ds.stats() {name} ---\n{r['stats']}")

    pruned, keep_all = pipelines["pruned"]["images_per_s"], pipelines["keep_all"]["images_per_s"]
    slowest_name = min(stages["pruned"], key=lambda k: stages["pruned"][k]["images_per_s"])
    slowest = stages["pruned"][slowest_name]["images_per_s"]
    speedup, efficiency = pruned / keep_all, pruned / slowest
    keep_all_slowest = min(v["images_per_s"] for v in stages["keep_all"].values())
    print(
        f"pruned / keep-all: {pruned:.3f} / {keep_all:.3f} = {speedup:.2f} "
        f"(target >= {TARGET_PRUNE_SPEEDUP}) -> {'PASS' if speedup >= TARGET_PRUNE_SPEEDUP else 'FAIL'}"
    )
    print(
        f"pruned pipeline / slowest stage alone ({slowest_name}): {pruned:.3f} / {slowest:.3f} = {efficiency:.2f} "
        f"(target >= {TARGET_PIPELINE_EFFICIENCY}) -> {'PASS' if efficiency >= TARGET_PIPELINE_EFFICIENCY else 'FAIL'}"
    )
    print(f"keep-all pipeline / its slowest stage alone: {keep_all:.3f} / {keep_all_slowest:.3f} = "
          f"{keep_all / keep_all_slowest:.2f}")
    wall = time.perf_counter() - t_all
    load_after = os.getloadavg()
    print(f"load average (1 min) before/after: {load_before[0]:.2f}/{load_after[0]:.2f}; wall {wall:.1f} s")
    result = {
        "rows": n_rows,
        "batch_size": args.batch_size,
        "max_new_tokens": cfg.generation.max_new_tokens,
        "pruned_images_per_s": round(pruned, 4),
        "keep_all_images_per_s": round(keep_all, 4),
        "images_per_s_from_second_batch": {n: round(r["images_per_s_from_second"], 4) for n, r in pipelines.items()},
        "pruned_over_keep_all": round(speedup, 3),
        "slowest_stage": slowest_name,
        "slowest_stage_images_per_s": round(slowest, 4),
        "pipeline_over_slowest_stage": round(efficiency, 3),
        "keep_all_pipeline_over_slowest_stage": round(keep_all / keep_all_slowest, 3),
        "stage_images_per_s": {n: {k: round(v["images_per_s"], 4) for k, v in s.items()} for n, s in stages.items()},
        "end_to_end_wall_s": {n: round(r["wall_s"], 2) for n, r in pipelines.items()},
        "end_to_end_images_per_s": {n: round(r["end_to_end_images_per_s"], 4) for n, r in pipelines.items()},
        "decode_utilisation": {n: round(r["decode_utilisation"], 3) for n, r in pipelines.items()},
        "targets_pass": {"pruned_over_keep_all": speedup >= TARGET_PRUNE_SPEEDUP,
                         "pipeline_over_slowest_stage": efficiency >= TARGET_PIPELINE_EFFICIENCY},
        "load_avg_1min": [round(load_before[0], 2), round(load_after[0], 2)],
        "wall_s": round(wall, 1),
    }
    tmp.cleanup()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
