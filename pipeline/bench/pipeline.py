"""Benchmark: the Ray job's images/s on ``tiny:llava-bench``, ResPrune keep 128 vs keep-all.

    python -m pipeline.bench.pipeline [--rows 48] [--batch-size 8] [--vqa-tokens 8] [--caption-tokens 32]
                                      [--engines hf,vllm] [--config configs/local.yaml] [--timeout 600]
                                      [--model-path tiny:llava-bench] [--no-warmup]

Two corpora of the same ``--rows`` sample-corpus images (``make_rows``, one Parquet file per
batch), one per kind of generation (``LENGTHS``): ``vqa``, each row's own short question (the
corpus's caption rows ask the count question instead), decoded with ``max_new_tokens`` =
``--vqa-tokens``; and ``caption``, "Describe the image." of every image, ``--caption-tokens``
(long answers: the cost moves from prefill to decode steps, where pruning saves less). Each goes
through the real pipeline twice per decode engine (``--engines``, default ``hf``; ``vllm`` sets
``decode_stage.engine``): ``resprune`` keeping 128 of 576 visual tokens, and ``none`` keeping
all 576; every figure is reported per engine and kind. Config:
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
of the stage's batch size (one untimed warm-up batch first); images/s = rows / total time. The
vLLM decode stage runs alone in a subprocess of the vLLM environment's interpreter (the one its
actors get, ``pipeline.engines.engine_environment``), fed this process's encode output. An
engine that cannot run (no vLLM environment, or its runs fail) gets null figures and a note.

Targets (printed, not enforced; exit status 0 unless an hf run fails or times out), per engine:
  pruned_images_per_s / keep_all_images_per_s >= 2
  pruned_images_per_s / slowest_stage_images_per_s (pruned config) >= 0.8
The last line is ``RESULT {json}``: ``<engine>_<kind>_...`` keys each engine's figures per kind
(``hf_vqa_pruned_over_keep_all``, ``vllm_caption_pruned_images_per_s``, ...); the unprefixed keys
are the hf engine's vqa figures (the figures this benchmark had before it ran captions; null when
hf was not run); per-config dicts are keyed ``<engine>_<kind>_<budget>`` (``hf_caption_pruned``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import pickle
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from pipeline.bench.engine import (LENGTHS, failure_line, kind_prompts, parse_engines, run_logged, split_batch,
                                   time_stage)
from pipeline.bench.prefill import cpu_seconds, descendants, process_cpu
from pipeline.config import ConfigError, JobConfig, load_config
from pipeline.engines import engine_environment
from pipeline.job import build_pipeline, check_resources
from pipeline.models.sources import resolve_model_path
from pipeline.stages.common import Batch, limit_torch_threads
from pipeline.stages.decode import DecodeStage
from pipeline.stages.encode import EncodeStage
from pipeline.stages.prepare import PrepareStage
from pipeline.stages.text import TextStage
from pipeline.tiny.shapes_world import SCHEMA, make_rows

REPO = Path(__file__).resolve().parents[2]
# CPUs per actor on a 2-CPU machine: decode is the bottleneck, so it gets a whole core (one
# torch thread); encode (still one thread), text, prepare and the read/finalize tasks a quarter
# each. 0.25 + 0.25 + 0.25 + 1.0 + 0.25 = 2.0, so every pool and one io task fit at once.
STAGE_CPUS = {"text_stage": 0.25, "prepare_stage": 0.25, "encode_stage": 0.25, "decode_stage": 1.0}
IO_CPUS = 0.25
TARGET_PRUNE_SPEEDUP = 2.0
TARGET_PIPELINE_EFFICIENCY = 0.8
# With one decode actor, a clean run keeps it busy ~100-110% of the first-to-last-arrival window
# (the second batch starts just before the first arrives); more means outputs arrived bunched.
BUNCHED = 1.25


def bench_config(
    config: Path, data_dir: Path, method: str, keep: int, batch_size: int, max_new_tokens: int,
    model_path: str = "tiny:llava-bench", engine: str = "hf",
) -> JobConfig:
    """``config`` with the bench model, method/keep, decode engine, and the 2-CPU pool sizes."""
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
        "decode_stage.engine": engine,
        # A benchmark corpus would let vLLM reuse whole prefills of repeated prompts (config docs).
        "decode_stage.vllm.enable_prefix_caching": False,
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


def time_stages(cfg: JobConfig, data_dir: Path, decode_python: str | None = None, timeout: int = 600,
                ) -> dict[str, dict[str, float]]:
    """Images/s of each stage run alone on all rows, with the pipeline's stage configs.
    ``decode_python``: run the decode stage in that interpreter (a subprocess, see
    ``decode_alone_elsewhere``) instead of this process."""
    batch = _to_batch(pq.read_table(data_dir))
    rows = len(batch["id"])
    figures: dict[str, dict[str, float]] = {}
    stages = [
        ("text", lambda: TextStage(cfg.text_stage), cfg.text_stage),
        ("prepare", lambda: PrepareStage(cfg.model, cfg.input, cfg.prepare_stage), cfg.prepare_stage),
        ("encode", lambda: EncodeStage(cfg.model, cfg.pruning, cfg.encode_stage), cfg.encode_stage),
        ("decode", lambda: DecodeStage(cfg.model, cfg.generation, cfg.input, cfg.decode_stage), cfg.decode_stage),
    ]
    for name, make, stage_cfg in stages:
        if name == "decode" and decode_python and decode_python != sys.executable:
            batch, figures[name] = decode_alone_elsewhere(cfg, batch, decode_python, timeout)
            continue
        limit_torch_threads(stage_cfg.num_cpus)
        stage = make()
        batch, seconds, others = time_stage(stage, split_batch(batch, stage_cfg.batch_size), stage_cfg.num_cpus)
        del stage
        gc.collect()
        figures[name] = {"seconds": seconds, "images_per_s": rows / seconds, "other_cpu_s": others}
    errors = [e for e in batch["error"] if e]
    if errors:
        raise RuntimeError(f"{len(errors)} rows failed in the stage run, e.g. {errors[0]!r}")
    return figures


def decode_alone_elsewhere(cfg: JobConfig, batch: Batch, python: str, timeout: int) -> tuple[Batch, dict[str, float]]:
    """The decode stage alone in another interpreter (the vLLM environment's), on this process's
    encode output: ``python -m pipeline.bench.engine --decode-stage-worker FILE`` (that module
    imports nothing the vLLM environment lacks; this one needs spaCy). Its output goes to our
    stderr; a failure raises RuntimeError with its last line."""
    with tempfile.TemporaryDirectory(prefix="resprune-bench-decode-") as tmp:
        inputs, out = Path(tmp) / "encoded.pkl", Path(tmp) / "decoded.pkl"
        with inputs.open("wb") as f:
            pickle.dump({"config": cfg.model_dump(mode="json"), "batch": batch}, f)
        rc, tail = run_logged(
            [python, "-m", "pipeline.bench.engine", "--decode-stage-worker", str(inputs), "--out", str(out)],
            timeout, "decode",
        )
        if rc is None:
            raise TimeoutError(f"decode stage alone in {python} did not finish within {timeout} s")
        if rc != 0 or not out.exists():
            raise RuntimeError(f"decode stage alone in {python} exited with status {rc}: {failure_line(tail)}")
        with out.open("rb") as f:
            done = pickle.load(f)
    return done["batch"], done["figures"]


# ---------------------------------------------------------------- the Ray Data pipeline


def run_pipeline(cfg: JobConfig, files: list[Path], timeout: int) -> dict[str, Any]:
    """Run read -> build_pipeline -> iter_batches once; arrival times of every output batch and
    where the CPU went between the first arrival and the last."""
    check_resources(cfg, ray.cluster_resources())
    busy0, wall0 = cpu_seconds()
    start = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    window: list[tuple[tuple[float, float], dict[int, tuple[int, str, float]]]] = []  # first / last arrival
    columns: dict[str, list] = {c: [] for c in ("error", "decode_ms", "encode_ms", "prune_ms", "text_ms", "prepare_ms",
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
        "prepare_utilisation": busy("prepare_ms") / steady_s if steady_s > 0 else float("nan"),
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
        f"  {name:<20} {r['images_per_s']:>7.3f} img/s steady ({r['rows']} rows in {r['batches']} batches; "
        f"first batch at {r['first_batch_s']:.1f} s, last at {r['first_batch_s'] + r['steady_s']:.1f} s; "
        f"{r['images_per_s_from_second']:.3f} img/s from the second batch), "
        f"end-to-end {r['wall_s']:.1f} s = {r['end_to_end_images_per_s']:.3f} img/s"
    )
    print(
        f"  {'':<20} decode actor busy {100 * r['decode_utilisation']:.0f}% of the steady window, "
        f"encode {100 * r['encode_utilisation']:.0f}%; in-pipeline rates while busy: decode "
        f"{r['decode_images_per_busy_s']:.3f} img/s, encode {r['encode_images_per_busy_s']:.3f} img/s; "
        f"machine CPU busy {100 * r['machine_cpu_busy']:.0f}%; tokens kept {r['mean_visual_tokens_kept']:.0f}, "
        f"prompt {r['mean_prompt_tokens']:.0f}, generated {r['mean_generated_tokens']:.1f}"
    )
    print(f"  {'':<20} batch arrivals (s after start): {r['arrivals_s']}")
    print(f"  {'':<20} CPU-s in the steady window ({r['steady_s']:.1f} s x {os.cpu_count()} cores): "
          f"{r['window_cpu_s']}")
    if r["decode_utilisation"] > BUNCHED:
        print(
            f"  {'':<20} WARNING: the decode actor worked {100 * r['decode_utilisation']:.0f}% of the window: the "
            "first batch reached the driver late (outputs bunched), so the steady figure overstates throughput; "
            "the from-second-batch figure is the better estimate for this run"
        )


def config_name(engine: str, kind: str, budget: str) -> str:
    return f"{engine}_{kind}_{budget}"


def write_kind_corpora(root: Path, rows: int, batch_size: int) -> dict[str, Path]:
    """``root/<kind>/``: the same ``rows`` sample-corpus images with each kind's prompts
    (``kind_prompts``), one Parquet file per batch; ``expected`` and ``question_type`` kept where
    the row's own question is asked. An existing corpus directory is used as it is."""
    data = make_rows(rows, seed=0)
    dirs = {}
    for kind, prompts in kind_prompts(data).items():
        out = dirs[kind] = root / kind
        if out.exists() and any(out.glob("*.parquet")):
            continue
        out.mkdir(parents=True, exist_ok=True)
        table = [{**r, "prompt": p} if p == r["prompt"]
                 else {**r, "prompt": p, "expected": None, "question_type": "count" if kind == "vqa" else kind}
                 for r, p in zip(data, prompts, strict=True)]
        # One file per batch, as a real corpus has many files: Ray Data's map operators do not
        # split their output blocks at batch boundaries, so a block larger than a batch would
        # make the next stage wait for all of it and the stages would run one after the other.
        for i in range(0, len(table), batch_size):
            pq.write_table(pa.Table.from_pylist(table[i : i + batch_size], schema=SCHEMA),
                           out / f"part-{i // batch_size:05d}.parquet")
    return dirs


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or math.isnan(x) else round(x, digits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48, help="sample-corpus rows")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per call, every stage")
    parser.add_argument("--vqa-tokens", type=int, default=8, help="max_new_tokens of the vqa corpus (short answers)")
    parser.add_argument("--caption-tokens", type=int, default=32,
                        help="max_new_tokens of the caption corpus (\"Describe the image.\"; a four-object caption is "
                        "~17 tokens on tiny:llava-shapes; the random-weight bench model rarely stops early)")
    parser.add_argument("--keep", type=int, default=128, help="ResPrune budget (of 576)")
    parser.add_argument("--engines", type=parse_engines, default=["hf"], help="decode engines: hf, vllm or hf,vllm")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "local.yaml")
    parser.add_argument("--model-path", default="tiny:llava-bench")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the corpora go (<dir>/vqa, <dir>/caption; kept if there); default: a fresh "
                        "temp dir")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per pipeline / stage run")
    parser.add_argument("--stats", action="store_true", help="print ds.stats() of every pipeline run")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="one untimed pipeline run on one file first (--no-warmup: quick smoke runs)")
    args = parser.parse_args()
    if min(args.rows, args.batch_size, args.vqa_tokens, args.caption_tokens) < 1:
        parser.error("--rows, --batch-size, --vqa-tokens and --caption-tokens must be >= 1")
    lengths = dict(zip(LENGTHS, (args.vqa_tokens, args.caption_tokens), strict=True))

    load_before = os.getloadavg()
    t_all = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="resprune-bench-")
    data_dirs = write_kind_corpora(args.data_dir or Path(tmp.name) / "corpus", args.rows, args.batch_size)
    n_rows = sum(pq.read_metadata(f).num_rows for f in data_dirs["vqa"].glob("*.parquet"))

    # Where each engine's decode actors run; an engine that cannot run is left out with a note
    # (hf always can: it runs in this interpreter).
    notes: list[str] = []
    environments: dict[str, dict[str, str]] = {}
    configs: dict[str, tuple[str, str, str, JobConfig]] = {}  # name -> (engine, kind, budget, config)
    for engine in args.engines:
        per_config = {
            (kind, budget): bench_config(args.config, data_dirs[kind], method, keep, args.batch_size, n,
                                         args.model_path, engine)
            for kind, n in lengths.items()
            for budget, method, keep in (("pruned", "resprune", args.keep), ("keep_all", "none", 576))
        }
        try:
            environments[engine] = engine_environment(per_config["vqa", "pruned"].decode_stage).as_dict()
        except ConfigError as e:
            notes.append(f"{engine} not run: {e}")
            continue
        configs |= {config_name(engine, k, b): (engine, k, b, c) for (k, b), c in per_config.items()}
    failed: set[str] = set()

    def give_up(engine: str, what: str, e: BaseException) -> None:
        """A non-hf engine's failure: its remaining runs are skipped, the rest go on."""
        if engine == "hf":
            raise e
        failed.add(engine)
        notes.append(f"{engine}: {what} failed, its remaining runs skipped: {type(e).__name__}: {e}")

    cfg = bench_config(args.config, data_dirs["vqa"], "resprune", args.keep, args.batch_size, args.vqa_tokens,
                       args.model_path)  # pool sizes: the same for every config
    print(
        f"model={cfg.model.path} rows={n_rows} per kind, files={len(list(data_dirs['vqa'].glob('*.parquet')))} "
        f"batch_size={args.batch_size} max_new_tokens per kind {lengths} "
        f"cpus: text {cfg.text_stage.num_cpus} prepare {cfg.prepare_stage.num_cpus} encode {cfg.encode_stage.num_cpus} decode {cfg.decode_stage.num_cpus} "
        f"io {cfg.ray.io_num_cpus} (ray.num_cpus={cfg.ray.num_cpus}); pruned = resprune keep {args.keep}, "
        f"keep-all = none keep 576; engines: "
        + ", ".join(f"{e} ({v['package']} {v['version']})" for e, v in environments.items())
    )

    # Stages alone first, before Ray starts: nothing else competes for the cores.
    stages: dict[str, dict[str, dict[str, float]]] = {}
    for name, (engine, kind, _, c) in configs.items():
        if engine in failed:
            continue
        try:
            with deadline(args.timeout, f"stages alone ({name})"):
                stages[name] = time_stages(c, data_dirs[kind], environments[engine]["python"], args.timeout)
        except (RuntimeError, TimeoutError, OSError) as e:
            give_up(engine, f"stages alone ({name})", e)
    limit_torch_threads(1)  # the driver only consumes batches from here on
    gc.collect()

    pipelines: dict[str, dict[str, Any]] = {}
    runnable = [(n, e, k, c) for n, (e, k, _, c) in configs.items() if e not in failed]
    if runnable:
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False)  # as pipeline.job._init_ray
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.use_datasource_v2 = False  # as pipeline.job: the V2 reader deadlocks on 2 CPUs
            ctx.enable_progress_bars = False
            files = {kind: sorted(d.glob("*.parquet")) for kind, d in data_dirs.items()}
            # Untimed warm-up on one file: the first pipeline after ray.init competes with Ray's
            # prestarted workers importing torch, which delays and bunches its early batches.
            name, engine, kind, c = runnable[0]
            try:
                if args.warmup:
                    run_pipeline(c, files[kind][:1], args.timeout)
            except Exception as e:  # noqa: BLE001 - any failure of a non-hf engine is reported, not fatal
                give_up(engine, f"pipeline warm-up ({name})", e)
            for name, engine, kind, c in runnable:
                if engine in failed:
                    continue
                try:
                    pipelines[name] = run_pipeline(c, files[kind], args.timeout)
                except Exception as e:  # noqa: BLE001
                    give_up(engine, f"pipeline ({name})", e)
        finally:
            ray.shutdown()

    print("each stage alone (in process, same stage configs and torch threads; vllm decode in its interpreter), "
          "images/s:")
    print(f"  {'config':<20} {'engine':<6} {'kind':<7} {'text':>8} {'encode':>8} {'decode':>8}   slowest   "
          "other processes' CPU-s (text/encode/decode)")
    for name, s in stages.items():
        slowest = min(s, key=lambda k: s[k]["images_per_s"])
        others = "/".join(f"{s[k]['other_cpu_s']:.1f}" for k in ("text", "encode", "decode"))
        engine, kind = configs[name][:2]
        print(
            f"  {name:<20} {engine:<6} {kind:<7} {s['text']['images_per_s']:>8.2f} {s['encode']['images_per_s']:>8.3f} "
            f"{s['decode']['images_per_s']:>8.3f}   {slowest:<8}  {others}"
        )
    print("Ray Data pipeline (read_parquet -> build_pipeline -> iter_batches):")
    for name, r in pipelines.items():
        _print_pipeline(name, r)
    if args.stats:
        for name, r in pipelines.items():
            print(f"--- ds.stats() {name} ---\n{r['stats']}")

    empty = ("pruned", "keep_all", "speedup", "slowest_stage", "slowest", "efficiency", "keep_all_efficiency")
    per_run: dict[tuple[str, str], dict[str, Any]] = {}  # (engine, kind) -> figures
    for engine in args.engines:
        for kind, n in lengths.items():
            p_name, k_name = config_name(engine, kind, "pruned"), config_name(engine, kind, "keep_all")
            label = f"{engine} {kind} ({n} new tokens)"
            fig: dict[str, Any] = dict.fromkeys(empty)
            if p_name in pipelines and k_name in pipelines and p_name in stages and k_name in stages:
                pruned, keep_all = pipelines[p_name]["images_per_s"], pipelines[k_name]["images_per_s"]
                slowest_name = min(stages[p_name], key=lambda k: stages[p_name][k]["images_per_s"])
                slowest = stages[p_name][slowest_name]["images_per_s"]
                keep_all_slowest = min(v["images_per_s"] for v in stages[k_name].values())
                fig = {"pruned": pruned, "keep_all": keep_all, "speedup": pruned / keep_all,
                       "slowest_stage": slowest_name, "slowest": slowest, "efficiency": pruned / slowest,
                       "keep_all_efficiency": keep_all / keep_all_slowest, "keep_all_slowest": keep_all_slowest}
                print(
                    f"{label}: pruned / keep-all: {pruned:.3f} / {keep_all:.3f} = {fig['speedup']:.2f} (target >= "
                    f"{TARGET_PRUNE_SPEEDUP}) -> {'PASS' if fig['speedup'] >= TARGET_PRUNE_SPEEDUP else 'FAIL'}"
                )
                print(
                    f"{label}: pruned pipeline / slowest stage alone ({slowest_name}): {pruned:.3f} / {slowest:.3f} = "
                    f"{fig['efficiency']:.2f} (target >= {TARGET_PIPELINE_EFFICIENCY}) -> "
                    f"{'PASS' if fig['efficiency'] >= TARGET_PIPELINE_EFFICIENCY else 'FAIL'}"
                )
                print(f"{label}: keep-all pipeline / its slowest stage alone: {keep_all:.3f} / "
                      f"{keep_all_slowest:.3f} = {fig['keep_all_efficiency']:.2f}")
            else:
                print(f"{label}: not measured (see the notes)")
            per_run[engine, kind] = fig
    for note in notes:
        print(f"note: {note}")
    wall = time.perf_counter() - t_all
    load_after = os.getloadavg()
    print(f"load average (1 min) before/after: {load_before[0]:.2f}/{load_after[0]:.2f}; wall {wall:.1f} s")

    def figures(fig: dict[str, Any]) -> dict[str, Any]:
        measured = fig["pruned"] is not None
        return {
            "pruned_images_per_s": _round(fig["pruned"]),
            "keep_all_images_per_s": _round(fig["keep_all"]),
            "pruned_over_keep_all": _round(fig["speedup"], 3),
            "slowest_stage": fig["slowest_stage"],
            "slowest_stage_images_per_s": _round(fig["slowest"]),
            "pipeline_over_slowest_stage": _round(fig["efficiency"], 3),
            "keep_all_pipeline_over_slowest_stage": _round(fig["keep_all_efficiency"], 3),
            "targets_pass": {"pruned_over_keep_all": fig["speedup"] >= TARGET_PRUNE_SPEEDUP,
                             "pipeline_over_slowest_stage": fig["efficiency"] >= TARGET_PIPELINE_EFFICIENCY}
            if measured else None,
        }

    hf_vqa = figures(per_run.get(("hf", "vqa")) or dict.fromkeys(empty))
    result: dict[str, Any] = {
        "rows": n_rows,
        "batch_size": args.batch_size,
        "new_tokens": lengths,
        "engines_run": args.engines,
        "engines": environments,
        "configs": [{"name": n, "engine": e, "kind": k, "method": c.pruning.method, "keep": c.pruning.keep,
                     "max_new_tokens": c.generation.max_new_tokens}
                    for n, (e, k, _, c) in configs.items()],
        **{k: v for k, v in hf_vqa.items() if k != "targets_pass"},  # unprefixed: hf, vqa (as before captions)
        "images_per_s_from_second_batch": {n: _round(r["images_per_s_from_second"]) for n, r in pipelines.items()},
        "stage_images_per_s": {n: {k: round(v["images_per_s"], 4) for k, v in s.items()} for n, s in stages.items()},
        "end_to_end_wall_s": {n: round(r["wall_s"], 2) for n, r in pipelines.items()},
        "end_to_end_images_per_s": {n: round(r["end_to_end_images_per_s"], 4) for n, r in pipelines.items()},
        "decode_utilisation": {n: _round(r["decode_utilisation"], 3) for n, r in pipelines.items()},
        "mean_generated_tokens": {n: round(r["mean_generated_tokens"], 2) for n, r in pipelines.items()},
        "targets_pass": hf_vqa["targets_pass"],
    }
    for (engine, kind), fig in per_run.items():
        result |= {f"{engine}_{kind}_{k}": v for k, v in figures(fig).items()}
    result |= {
        "notes": notes,
        "load_avg_1min": [round(load_before[0], 2), round(load_after[0], 2)],
        "wall_s": round(wall, 1),
    }
    tmp.cleanup()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
