"""Benchmark: decode engines (HF ``generate`` vs vLLM) on the same kept visual tokens, keep-all vs ResPrune.

    python -m pipeline.bench.engine [--model tiny:llava-bench] [--images 32] [--keep 128]
                                    [--vqa-tokens 8] [--caption-tokens 32] [--engines hf,vllm] [--hf-batch-size 8]
                                    [--max-num-seqs 64] [--cpu-kv-cache-gib 4] [--threads 1] [--repeats 1]
                                    [--timeout 1200]

The parent process encodes ``--images`` sample-corpus images once with the checkpoint's vision
part (``load_adapter(..., "vision")`` on CPU) and prunes them as the encode stage does: ``none``
(every token, 576 on LLaVA-1.5) and ``resprune`` keeping ``--keep`` (seeded by CLS attention, no
text relevance). Two kinds of generation run on the same images (``LENGTHS``): ``vqa``, each
row's own short question (a caption row of the corpus asks the count question instead), up to
``--vqa-tokens`` new tokens; and ``caption``, "Describe the image." of every image, up to
``--caption-tokens``: long answers move the cost from prefill, which pruning shrinks most, to
decode steps. The kept tokens and both kinds' prompts go to a temp ``.pt`` file; each engine
then runs in a subprocess of its own interpreter (``engine_environment(stage).python``: the
driver's for hf, the vLLM environment's for vllm), ``python -m pipeline.bench.engine --worker
ENGINE --inputs FILE --out FILE``, which

- builds the engine once through ``pipeline.engines.load_engine`` (start-up timed apart),
- warms up on 2 rows of each kind and budget,
- times ``engine.generate`` over every request for each (budget, kind) cell: hf in the decode
  stage's calls (rows sorted by prefill length, at most ``--hf-batch-size`` rows and
  ``max_batch_tokens`` padded tokens per call), vllm in one call (it schedules the rows itself,
  ``max_num_seqs`` at a time, prefix caching off so no request reuses another's prefill).

``--repeats N`` times each cell N times (median), the budgets' order alternating between
repeats. Each cell also reports the share of the machine's CPU that other processes took while
it ran ("other load"): figures taken under load are not comparable with quiet ones.

Greedy, ``max_new_tokens`` = the kind's length. There is no ``ignore_eos``: a row may stop early at EOS,
so the mean generated tokens of every cell is reported beside its images/s (compare engines on
cells with equal means). Both engines run on the same requests, so the share of rows whose
generated ids agree between them is reported as well.

Target (printed, not enforced): vLLM pruned images/s >= 2 x vLLM keep-all, for both kinds.
An engine that cannot run (no vLLM in its interpreter, or its worker fails or times out) gets
null cells and a note saying why; the benchmark still ends with ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
BUDGETS = ("keep_all", "pruned")
ENGINES = ("hf", "vllm")
LENGTHS = ("vqa", "caption")  # kinds of generation, each its own cell, key suffix and row of the table
TARGET_VLLM_PRUNE_SPEEDUP = 2.0
WARMUP_ROWS = 2


def parse_engines(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"engines are a comma-separated subset of {', '.join(ENGINES)}, got {text!r}")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------- parent: encode and prune once


def kind_prompts(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Per kind of generation (LENGTHS), every row's prompt, so both kinds run on the same images:
    vqa asks the row's own question, or the count question (which every scene supports) where the
    corpus drew a caption; caption asks every image for one."""
    from pipeline.tiny.shapes_world import CAPTION_PROMPT, SINGLE_WORD

    count = f"How many shapes are in the picture?{SINGLE_WORD}"
    vqa = [count if r["question_type"] == "caption" else str(r["prompt"]) for r in rows]
    return {"vqa": vqa, "caption": [CAPTION_PROMPT] * len(rows)}


def prepare_requests(model_path: str, images: int, keep: int, encode_batch: int = 8) -> dict[str, Any]:
    """Encode ``images`` sample-corpus rows and prune them both ways; the payload the workers load
    (``requests[budget]`` the kept tokens per row, ``prompts[kind]`` the rows' prompts per kind)."""
    import torch

    from pipeline.config import InputConfig, ModelConfig
    from pipeline.io.images import decode_image
    from pipeline.tiny.shapes_world import make_rows
    from pipeline.models import load_adapter
    from pipeline.pruning import get_method

    vision = load_adapter(ModelConfig(path=model_path, device="cpu"), "vision")
    limits = InputConfig(path="unused")
    rows = make_rows(images, seed=0)
    pictures = []
    for r in rows:
        img = decode_image(r["image"], limits.max_image_pixels, limits.min_image_side)
        if isinstance(img, str):
            raise RuntimeError(f"sample row {r['id']}: {img}")
        pictures.append(img)
    requests: dict[str, list[dict[str, Any]]] = {b: [] for b in BUDGETS}
    encode_s = prune_s = 0.0
    n_visual = 0
    for start in range(0, len(rows), encode_batch):
        chunk = slice(start, start + encode_batch)
        t0 = time.perf_counter()
        enc = vision.encode(pictures[chunk])
        encode_s += time.perf_counter() - t0
        visual = torch.stack([f.cpu().float() for f in enc.features])  # LLaVA: one token count for all
        scores = torch.stack([s.cpu() for s in enc.seed_scores]) if enc.seed_scores else None
        n_visual = visual.shape[1]
        for budget, method, k in (("keep_all", "none", n_visual), ("pruned", "resprune", min(keep, n_visual))):
            t0 = time.perf_counter()
            idx = get_method(method)(visual, k, relevance=None, scores=scores, alpha=vision.default_alpha)
            if budget == "pruned":
                prune_s += time.perf_counter() - t0
            for j, row in enumerate(rows[chunk]):
                kept = idx[j].sort().values
                requests[budget].append({
                    "id": str(row["id"]), "visual": visual[j][kept].contiguous(),
                    "kept_indices": kept.to(torch.long), "payload": vision.kept_payload(enc.payloads[j], kept),
                })
    return {
        "model_path": model_path, "visual_tokens": int(n_visual), "keep": min(keep, n_visual),
        "requests": requests, "prompts": kind_prompts(rows), "encode_s": encode_s, "prune_s": prune_s,
    }


# ---------------------------------------------------------------- worker: one engine, every cell


def _hf_calls(lengths: list[int], batch_size: int, max_batch_tokens: int, new_tokens: int) -> list[list[int]]:
    """Rows cut into Ray-batch-sized groups in corpus order, then grouped into padded calls as the
    decode stage does with each Ray batch (``padded_calls``)."""
    from pipeline.stages.decode import padded_calls

    calls: list[list[int]] = []
    for start in range(0, len(lengths), batch_size):
        chunk = {i: lengths[i] for i in range(start, min(start + batch_size, len(lengths)))}
        calls += padded_calls(chunk, new_tokens, max_batch_tokens)
    return calls


def _tree_cpu() -> float:
    """CPU-seconds so far of this process and every process below it."""
    from pipeline.bench.prefill import descendants, process_cpu

    snapshot = process_cpu()
    return sum(snapshot[pid][2] for pid in descendants(snapshot, os.getpid()) if pid in snapshot)


def run_worker(args: argparse.Namespace) -> None:
    t_process = time.perf_counter()
    import torch

    from pipeline.bench.prefill import cpu_seconds
    from pipeline.config import DecodeStageConfig, GenerationConfig, ModelConfig
    from pipeline.engines import DecodeRequest, load_engine

    payload = torch.load(args.inputs, weights_only=True)  # tensors, lists, dicts of plain values
    model = ModelConfig(**payload["model"])
    stage = DecodeStageConfig(**payload["stages"][args.worker])
    kinds: dict[str, int] = payload["new_tokens"]  # kind of generation -> its max new tokens
    hf_batch_size: int = payload["hf_batch_size"]
    repeats: int = payload["repeats"]
    if args.threads:
        torch.set_num_threads(args.threads)
    requests = {  # kind -> budget -> requests: one set of kept tokens, each kind's prompts
        kind: {b: [DecodeRequest(r["id"], prompt, r["visual"], r["kept_indices"], r["payload"])
                   for r, prompt in zip(rows, payload["prompts"][kind], strict=True)]
               for b, rows in payload["requests"].items()}
        for kind in kinds
    }
    out: dict[str, Any] = {"engine": args.worker, "python": sys.executable, "torch_threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    out["import_s"] = t0 - t_process
    engine = load_engine(model, stage)
    out["startup_s"] = time.perf_counter() - t0
    out["schedules_batches"] = engine.schedules_batches
    print(f"[{args.worker}] engine {engine.name} up in {out['startup_s']:.1f} s", flush=True)

    def calls(rows: list[DecodeRequest], new_tokens: int) -> list[list[int]]:
        if engine.schedules_batches:
            return [list(range(len(rows)))]
        lengths = [engine.adapter.text_tokens(r.prompt) + len(r.visual) for r in rows]
        return _hf_calls(lengths, hf_batch_size, stage.max_batch_tokens, new_tokens)

    def generate(rows: list[DecodeRequest], new_tokens: int) -> tuple[list[Any], float, int]:
        gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False)
        groups = calls(rows, new_tokens)
        results: list[Any] = [None] * len(rows)
        start = time.perf_counter()
        for group in groups:
            try:
                answers = engine.generate([rows[i] for i in group], gen)
            except Exception as e:  # a failed call fails its rows; the cell reports them
                answers = [e] * len(group)
            for i, a in zip(group, answers, strict=True):
                results[i] = a
        return results, time.perf_counter() - start, len(groups)

    t0 = time.perf_counter()
    for kind in kinds:
        for budget in BUDGETS:
            warm, _, _ = generate(requests[kind][budget][:WARMUP_ROWS], min(kinds.values()))
            failed = [r for r in warm if isinstance(r, Exception)]
            if failed:
                raise RuntimeError(f"warm-up ({kind}, {budget}) failed: {failed[0]!r}")
    out["warmup_s"] = time.perf_counter() - t0

    cells: dict[str, Any] = {}
    cores = os.cpu_count() or 1
    for kind, new_tokens in kinds.items():
        for repeat in range(repeats):
            # Budgets alternate in order from one repeat to the next (ABBA...), so load that drifts
            # during the run does not always fall on the same budget.
            for budget in BUDGETS if repeat % 2 == 0 else BUDGETS[::-1]:
                rows = requests[kind][budget]
                (busy0, _), tree0 = cpu_seconds(), _tree_cpu()
                results, seconds, n_calls = generate(rows, new_tokens)
                (busy1, _), tree1 = cpu_seconds(), _tree_cpu()
                # Machine CPU-s outside this process and its children (vLLM's engine core):
                # another load on the machine, as a share of all its cores over the cell.
                other = max(0.0, (busy1 - busy0) - (tree1 - tree0)) / (seconds * cores)
                key = f"{budget}_{kind}"
                if key in cells:
                    cells[key]["all_seconds"].append(seconds)
                    cells[key]["other_cpu_shares"].append(other)
                    print(f"[{args.worker}] {budget} {kind} x {new_tokens} tokens, repeat {repeat + 1}: "
                          f"{seconds:.1f} s", flush=True)
                    continue
                ok = [r for r in results if not isinstance(r, Exception)]
                errors = [repr(r) for r in results if isinstance(r, Exception)]
                cells[key] = {
                    "new_tokens": new_tokens, "rows": len(rows), "ok": len(ok), "errors": len(errors),
                    "first_error": errors[0] if errors else None, "calls": n_calls,
                    "all_seconds": [seconds], "other_cpu_shares": [other],
                    "mean_generated_tokens": statistics.fmean(r.generated_tokens for r in ok) if ok else None,
                    "mean_prompt_tokens": statistics.fmean(r.prompt_tokens for r in ok) if ok else None,
                    "generated_tokens": sum(r.generated_tokens for r in ok),
                    "token_ids": [None if isinstance(r, Exception) else list(r.token_ids) for r in results],
                }
                print(f"[{args.worker}] {budget} {kind} x {new_tokens} tokens: {seconds:.1f} s, {n_calls} calls, "
                      f"{len(errors)} errors, other load {100 * other:.0f}% of the machine", flush=True)
    for cell in cells.values():
        seconds = cell["seconds"] = statistics.median(cell["all_seconds"])
        cell["other_cpu_share"] = statistics.fmean(cell["other_cpu_shares"])
        cell["images_per_s"] = cell["ok"] / seconds if cell["ok"] else None
        cell["generated_tokens_per_s"] = cell["generated_tokens"] / seconds if cell["ok"] else None
    out["cells"] = cells
    Path(args.out).write_text(json.dumps(out))


# ---------------------------------------------------------------- one stage alone, timed
# Shared with pipeline.py ("each stage alone"). Here because this module imports nothing heavy at
# the top, so ``--decode-stage-worker`` also runs in the vLLM interpreter (no spaCy, no Ray Data).

Rows = dict[str, Any]  # a stage batch (pipeline.stages.common.Batch), named here without importing it


def concat_batches(batches: list[Rows]) -> Rows:
    out: Rows = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        out[key] = np.concatenate(parts) if isinstance(parts[0], np.ndarray) else [v for p in parts for v in p]
    return out


def split_batch(batch: Rows, size: int) -> list[Rows]:
    n = len(batch["id"])
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def time_stage(stage: Any, batches: list[Rows], num_cpus: float) -> tuple[Rows, float, float]:
    """One untimed warm-up call on a copy of the first batch, then every batch, timed in total.
    Returns the output, the seconds, and the CPU-seconds other processes (not this one nor its
    children, such as vLLM's engine core) took meanwhile."""
    from pipeline.bench.prefill import cpu_seconds
    from pipeline.stages.common import limit_torch_threads

    limit_torch_threads(num_cpus)  # what the actor does; set again because stages share this process
    stage(dict(batches[0]))
    busy0, start = cpu_seconds()
    own0 = _tree_cpu()
    outputs = [stage(b) for b in batches]
    busy1, end = cpu_seconds()
    return concat_batches(outputs), end - start, (busy1 - busy0) - (_tree_cpu() - own0)


def decode_stage_worker(inputs: Path, out: Path) -> None:
    """``--decode-stage-worker``: the decode stage alone on pickled encode output (``pipeline.py``'s
    stages-alone figure for an engine in another interpreter)."""
    import pickle

    from pipeline.config import validate_config
    from pipeline.stages.common import limit_torch_threads
    from pipeline.stages.decode import DecodeStage

    with inputs.open("rb") as f:
        job = pickle.load(f)
    cfg, batch = validate_config(job["config"]), job["batch"]
    rows = len(batch["id"])
    stage_cfg = cfg.decode_stage
    limit_torch_threads(stage_cfg.num_cpus)
    stage = DecodeStage(cfg.model, cfg.generation, cfg.input, stage_cfg)
    batch, seconds, others = time_stage(stage, split_batch(batch, stage_cfg.batch_size), stage_cfg.num_cpus)
    with out.open("wb") as f:
        pickle.dump({"batch": batch, "figures": {"seconds": seconds, "images_per_s": rows / seconds,
                                                  "other_cpu_s": others}}, f)


# ---------------------------------------------------------------- parent: run the workers


def run_logged(cmd: list[str], timeout: float, prefix: str, env: dict[str, str] | None = None,
               ) -> tuple[int | None, list[str]]:
    """Run ``cmd`` in the repository in a session of its own, its output copied to our stderr
    with ``prefix``; ``(exit status, last lines)``, status None when it ran past ``timeout`` s.
    On timeout or on any exception here (a caller's SIGALRM deadline) its whole process group is
    killed: vLLM's engine-core child goes with the worker."""
    tail: collections.deque[str] = collections.deque(maxlen=80)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True, env={**os.environ, **(env or {})})
    expired = threading.Event()

    def _kill() -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass

    def _expire() -> None:
        expired.set()
        _kill()

    timer = threading.Timer(timeout, _expire)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            sys.stderr.write(f"  {prefix}| {line}")
        rc = proc.wait()
    finally:
        timer.cancel()
        _kill()
        if proc.stdout is not None:
            proc.stdout.close()
    return (None if expired.is_set() else rc), list(tail)


_EXCEPTION = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt)\b.*")


def failure_line(tail: list[str]) -> str:
    """The last exception line of a failed process's output (vLLM logs its shutdown after the
    traceback), else its last non-empty line."""
    lines = [t.strip() for t in tail if t.strip()]
    return next((t for t in reversed(lines) if _EXCEPTION.match(t)), lines[-1] if lines else "(no output)")


def run_engine(engine: str, python: str, inputs: Path, out: Path, timeout: int, threads: int | None) -> dict[str, Any]:
    """Run one worker; its result, or ``{"error": why}``."""
    cmd = [python, "-m", "pipeline.bench.engine", "--worker", engine, "--inputs", str(inputs), "--out", str(out)]
    env = {}
    if threads:  # torch's intra-op threads, vLLM's CPU worker (its own process) included
        cmd += ["--threads", str(threads)]
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    rc, tail = run_logged(cmd, timeout, engine, env)
    wall = time.perf_counter() - start
    if rc is None:
        return {"error": f"{engine} worker did not finish within {timeout} s (--timeout)", "wall_s": wall}
    if rc != 0 or not out.exists():
        return {"error": f"{engine} worker exited with status {rc}: {failure_line(tail)}", "wall_s": wall}
    result = json.loads(out.read_text())
    result["wall_s"] = wall
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, digits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:llava-bench", help="tiny:<recipe>, a checkpoint dir or hub id")
    parser.add_argument("--images", type=int, default=32, help="sample-corpus images (requests per cell)")
    parser.add_argument("--keep", type=int, default=128, help="ResPrune budget (of 576)")
    parser.add_argument("--vqa-tokens", type=int, default=8,
                        help="max new tokens of the vqa kind (the rows' short questions; default %(default)s)")
    parser.add_argument("--caption-tokens", type=int, default=32,
                        help="max new tokens of the caption kind (\"Describe the image.\"; default %(default)s: "
                        "a four-object caption is ~17 tokens on tiny:llava-shapes, longer on real models)")
    parser.add_argument("--engines", type=parse_engines, default=list(ENGINES), help="hf,vllm or one of them")
    parser.add_argument("--hf-batch-size", type=int, default=8, help="hf: rows per decode-stage batch")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="vllm: sequences at once")
    parser.add_argument("--max-model-len", type=int, default=None, help="vllm: tokens per sequence (default: model's)")
    parser.add_argument("--cpu-kv-cache-gib", type=int, default=4, help="vllm on CPU: KV cache GiB")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="the engines' device")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per engine (OMP_NUM_THREADS and torch's); 0: one per core. Default 1, as "
                        "the decode actor of pipeline.bench.pipeline (num_cpus 1.0): on a 2-core machine shared "
                        "with other work, 2 threads per engine stall on OpenMP barriers (10x slower seen here)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs per cell (median), budgets alternating in order between runs")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per engine worker")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--decode-stage-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    if args.decode_stage_worker:
        decode_stage_worker(args.decode_stage_worker, args.out)
        return
    if args.images < WARMUP_ROWS or min(args.keep, args.hf_batch_size, args.repeats, args.vqa_tokens,
                                         args.caption_tokens) < 1:
        parser.error(f"--images must be >= {WARMUP_ROWS}; --keep, --hf-batch-size, --repeats, --vqa-tokens and "
                     "--caption-tokens >= 1")
    lengths = {"vqa": args.vqa_tokens, "caption": args.caption_tokens}  # in LENGTHS order

    import torch

    from pipeline.config import ConfigError, DecodeStageConfig, ModelConfig, VLLMConfig
    from pipeline.engines import engine_environment
    from pipeline.models import detect_family
    from pipeline.models.sources import resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)  # the parent's encode too, as the workers
    load_before = os.getloadavg()
    t_all = time.perf_counter()
    path = resolve_model_path(args.model)
    payload = prepare_requests(path, args.images, args.keep)
    gc.collect()
    model = ModelConfig(path=path, family=detect_family(path), device=args.device, dtype="auto")
    vllm_cfg = VLLMConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          cpu_kv_cache_gib=args.cpu_kv_cache_gib, enable_prefix_caching=False)
    stages = {e: DecodeStageConfig(engine=e, vllm=vllm_cfg) for e in args.engines}
    payload |= {
        "model": model.model_dump(), "stages": {e: s.model_dump() for e, s in stages.items()},
        "new_tokens": lengths, "hf_batch_size": args.hf_batch_size, "repeats": args.repeats,
    }
    print(
        f"model={path} images={args.images} visual tokens={payload['visual_tokens']} pruned = resprune keep "
        f"{payload['keep']}, keep-all = none; max new tokens {lengths}; engines {args.engines}; threads "
        f"{args.threads or 'one per core'}; encode "
        f"{payload['encode_s']:.1f} s, prune {payload['prune_s']:.2f} s (parent, once)"
    )

    notes: list[str] = []
    workers: dict[str, dict[str, Any]] = {}
    environments: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="resprune-bench-engine-") as tmp:
        inputs = Path(tmp) / "requests.pt"
        torch.save(payload, inputs)
        del payload["requests"]
        gc.collect()
        for engine in args.engines:
            try:
                env = engine_environment(stages[engine])
            except ConfigError as e:
                workers[engine] = {"error": f"{engine} not run: {e}"}
                notes.append(workers[engine]["error"])
                continue
            environments[engine] = env.as_dict()
            print(f"running {engine} ({env.package} {env.version}) in {env.python}", flush=True)
            workers[engine] = run_engine(engine, env.python, inputs, Path(tmp) / f"{engine}.json", args.timeout,
                                         args.threads)
            if "error" in workers[engine]:
                notes.append(workers[engine]["error"])

    def cell(engine: str, budget: str, kind: str) -> dict[str, Any] | None:
        return workers.get(engine, {}).get("cells", {}).get(f"{budget}_{kind}")

    def rate(engine: str, budget: str, kind: str) -> float | None:
        c = cell(engine, budget, kind)
        return c["images_per_s"] if c else None

    print(f"{'kind':<7} {'engine':<6} {'budget':<9} {'visual':>6} {'new tok':>7} {'images/s':>9} {'seconds':>8} "
          f"{'calls':>5} {'gen tok mean':>12} {'prompt tok mean':>15} {'errors':>6} {'other load':>10}")
    for kind, n in lengths.items():
        for engine in args.engines:
            for budget in BUDGETS:
                c = cell(engine, budget, kind)
                visual = payload["visual_tokens"] if budget == "keep_all" else payload["keep"]
                if c is None:
                    print(f"{kind:<7} {engine:<6} {budget:<9} {visual:>6} {n:>7} {'-':>9}   (not run)")
                    continue
                ips = f"{c['images_per_s']:.3f}" if c["images_per_s"] else "-"
                gen = f"{c['mean_generated_tokens']:.1f}" if c["mean_generated_tokens"] is not None else "-"
                prm = f"{c['mean_prompt_tokens']:.0f}" if c["mean_prompt_tokens"] is not None else "-"
                print(f"{kind:<7} {engine:<6} {budget:<9} {visual:>6} {n:>7} {ips:>9} {c['seconds']:>8.2f} "
                      f"{c['calls']:>5} {gen:>12} {prm:>15} {c['errors']:>6} {100 * c['other_cpu_share']:>9.0f}%")
                if c["errors"]:
                    notes.append(f"{engine} {budget} {kind} x {n}: {c['errors']} of {c['rows']} rows failed, e.g. "
                                 f"{c['first_error']}")
    for engine in args.engines:
        w = workers[engine]
        if "startup_s" in w:
            print(f"{engine}: {environments[engine]['package']} {environments[engine]['version']} start-up {w['startup_s']:.1f} s (engine build; imports "
                  f"{w['import_s']:.1f} s, warm-up {w['warmup_s']:.1f} s, worker wall {w['wall_s']:.1f} s, "
                  f"{w['torch_threads']} torch threads)")

    result: dict[str, Any] = {
        "model": path, "images": args.images, "visual_tokens": payload["visual_tokens"], "keep": payload["keep"],
        "new_tokens": lengths, "engines_run": args.engines, "engines": environments,
        "threads": args.threads or os.cpu_count(),
    }
    identical: dict[str, float | None] = {}
    generated: dict[str, float | None] = {}
    for kind in lengths:  # keys end in the kind (vqa, caption); result["new_tokens"] gives its length
        for engine in ENGINES:
            for budget in BUDGETS:
                result[f"{engine}_{budget}_{kind}"] = _round(rate(engine, budget, kind))
                c = cell(engine, budget, kind)
                generated[f"{engine}_{budget}_{kind}"] = _round(c["mean_generated_tokens"], 2) if c else None
        hf_all, hf_pr = rate("hf", "keep_all", kind), rate("hf", "pruned", kind)
        vl_all, vl_pr = rate("vllm", "keep_all", kind), rate("vllm", "pruned", kind)
        result[f"hf_pruned_over_hf_keep_all_{kind}"] = _ratio(hf_pr, hf_all)
        result[f"vllm_pruned_over_vllm_keep_all_{kind}"] = _ratio(vl_pr, vl_all)
        result[f"hf_over_vllm_keep_all_{kind}"] = _ratio(hf_all, vl_all)
        result[f"hf_over_vllm_pruned_{kind}"] = _ratio(hf_pr, vl_pr)
        speedup = vl_pr / vl_all if vl_pr and vl_all else None
        result[f"target_vllm_pruned_2x_keep_all_{kind}"] = (None if speedup is None
                                                            else speedup >= TARGET_VLLM_PRUNE_SPEEDUP)
        for budget in BUDGETS:
            a, b = cell("hf", budget, kind), cell("vllm", budget, kind)
            if a and b:
                pairs = [(x, y) for x, y in zip(a["token_ids"], b["token_ids"], strict=True) if x is not None and y is not None]
                identical[f"{budget}_{kind}"] = round(sum(x == y for x, y in pairs) / len(pairs), 3) if pairs else None
    for engine in ENGINES:
        result[f"{engine}_startup_s"] = _round(workers.get(engine, {}).get("startup_s"), 2)
    result["startup_s"] = {e: result[f"{e}_startup_s"] for e in args.engines}
    result["mean_generated_tokens"] = generated
    result["other_cpu_share"] = {
        f"{e}_{b}_{kind}": round(c["other_cpu_share"], 3)
        for kind in lengths for e in ENGINES for b in BUDGETS if (c := cell(e, b, kind))
    }
    result["repeats"] = args.repeats
    result["hf_vllm_identical_token_ids"] = identical

    for kind, n in lengths.items():
        hf_r, vl_r = result[f"hf_pruned_over_hf_keep_all_{kind}"], result[f"vllm_pruned_over_vllm_keep_all_{kind}"]
        line = f"{kind} ({n} new tokens): pruned / keep-all: hf {hf_r if hf_r is not None else '-'}, vllm "
        line += f"{vl_r if vl_r is not None else '-'}"
        target = result[f"target_vllm_pruned_2x_keep_all_{kind}"]
        line += f" (target vllm >= {TARGET_VLLM_PRUNE_SPEEDUP}: {'-' if target is None else 'PASS' if target else 'FAIL'})"
        hk, hp = result[f"hf_over_vllm_keep_all_{kind}"], result[f"hf_over_vllm_pruned_{kind}"]
        if hk is not None or hp is not None:
            line += f"; hf / vllm: keep-all {hk}, pruned {hp}"
        print(line)
    if identical:
        print(f"rows whose generated ids agree between hf and vllm: {identical}")
    for note in notes:
        print(f"note: {note}")
    wall = time.perf_counter() - t_all
    load_after = os.getloadavg()
    print(f"load average (1 min) before/after: {load_before[0]:.2f}/{load_after[0]:.2f}; wall {wall:.1f} s")
    result["notes"] = notes
    result["load_avg_1min"] = [round(load_before[0], 2), round(load_after[0], 2)]
    result["wall_s"] = round(wall, 1)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
