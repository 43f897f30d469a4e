"""Annotate an image corpus: `python jobs/caption_corpus.py --config configs/local.yaml`.

Works the same under `ray job submit --working-dir . -- python jobs/caption_corpus.py ...`.
Exit status: 0 when every input row is in the output exactly once (rows with an `error`
included), 1 when ids are missing or repeated there, 2 on a configuration or input error
(nothing was run), 3 when the run stopped part-way (storage, workers, decode engines failing more
than decode_stage.max_engine_restarts times): what it committed is
kept, and the same command with `--resume` finishes it; 4 when another driver on the Ray
cluster is writing the same output (nothing was run). With `--incremental` and no new input
shard it prints so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.engines import engine_names  # noqa: E402
from pipeline.io.inputs import InputError  # noqa: E402
from pipeline.io.runs import NothingToRun  # noqa: E402
from pipeline.job import OutputBusy, RunFailed, run_job  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config (see configs/ and pipeline/config.py)")
    p.add_argument("--input", help="override input.path (local path or s3:// URI)")
    p.add_argument("--output", help="override output.path (a directory of Parquet files)")
    p.add_argument("--format", choices=("parquet", "files", "webdataset"),
                   help="override input.format: Parquet rows, image files under the prefix, or tar shards (docs/inputs.md)")
    p.add_argument("--prompt", help="override input.prompt: every row's prompt, for inputs without a prompt column")
    p.add_argument("--method", help="override pruning.method")
    p.add_argument("--keep", type=int, help="override the budget: keep up to this many visual tokens per image")
    p.add_argument("--prune-ratio", type=float, help="override the budget: prune this fraction of each image's tokens")
    p.add_argument("--alpha", type=float, help="override pruning.alpha")
    p.add_argument("--energy", type=float,
                   help="override pruning.energy: an adaptive budget (resprune) keeping per image the fewest tokens that "
                   "explain this fraction of its token energy, the budget (--keep / --prune-ratio) as the cap")
    p.add_argument("--min-keep", type=int, help="override pruning.min_keep (the adaptive budget's floor)")
    p.add_argument("--engine", choices=engine_names(), help="override decode_stage.engine (see the README's Engines)")
    p.add_argument("--resume", action="store_true",
                   help="output.mode: resume: finish an earlier attempt of this run, every row exactly once")
    p.add_argument("--incremental", action="store_true",
                   help="output.incremental: output is a root of runs; annotate only the input shards no earlier run "
                   "under it took (finishing an unfinished run first)")
    return p


def overrides_from(args: argparse.Namespace) -> dict[str, object]:
    """The config fields the command line sets, as dotted keys for ``load_config``."""
    fields = {"input": "input.path", "output": "output.path", "format": "input.format", "prompt": "input.prompt",
              "method": "pruning.method", "keep": "pruning.keep",
              "prune_ratio": "pruning.prune_ratio", "alpha": "pruning.alpha", "energy": "pruning.energy",
              "min_keep": "pruning.min_keep", "engine": "decode_stage.engine"}
    overrides: dict[str, object] = {key: getattr(args, arg) for arg, key in fields.items() if getattr(args, arg) is not None}
    if args.resume:
        overrides["output.mode"] = "resume"
    if args.incremental:
        overrides["output.incremental"] = True
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = overrides_from(args)
    try:
        cfg = load_config(args.config, overrides)
        summary = run_job(cfg)
    except ConfigError as e:
        print(f"{'input' if isinstance(e, InputError) else 'config'} error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"run failed: {e}", file=sys.stderr)
        return 3
    except OutputBusy as e:
        print(f"output busy: {e}", file=sys.stderr)
        return 4
    except NothingToRun as e:  # a scheduled run with no new shard: done, nothing to do
        print(f"nothing to run: {e}")
        return 0
    print("SUMMARY " + json.dumps(summary.as_dict(), sort_keys=True))
    dropped = f", {sum(summary.dropped.values())} dropped by input.id_policy {summary.dropped}" if summary.dropped else ""
    print(
        f"{summary.output_rows}/{summary.expected_rows} rows in {summary.output} "
        f"({summary.ok_rows} answered, {summary.error_rows} with an error: {summary.errors_by_kind or 'none'}); "
        f"{summary.input_rows} input rows{dropped}; this attempt wrote {summary.written_this_attempt}, "
        f"{summary.skipped_already_done} were already done"
    )
    if summary.missing_ids or summary.duplicate_ids:
        print(f"NOT COMPLETE: {summary.missing_ids} ids missing, {summary.duplicate_ids} repeated", file=sys.stderr)
    engine = summary.engine
    print(f"decode engine: {engine['name']} ({engine['package']} {engine['version']})")
    if summary.engine_restarts:
        print(f"decode engines that died or got stuck and were replaced: {summary.engine_restarts} "
              f"({summary.retried_batches} batch(es) ran again; reasons: engine_failures in {summary.manifest})")
    kept = summary.visual_tokens_kept
    spread = f" (p50 {kept['p50']:g}, p90 {kept['p90']:g}, {kept['min']:g}-{kept['max']:g})" if kept.get("p50") else ""
    print(f"visual tokens per image: {summary.mean_visual_tokens_in:g} in, {summary.mean_visual_tokens_kept:g} kept"
          f"{spread} ({cfg.pruning.method}, {cfg.pruning.describe()})")
    if summary.energy_explained.get("mean") is not None:
        e = summary.energy_explained
        print(f"token energy explained by the kept tokens: mean {e['mean']:.6f}, p50 {e['p50']:.6f}, "
              f"min {e['min']:.6f}")
    mean = summary.cost_mean_per_image
    if mean.get("flops_total"):
        print(
            f"per image: ${1000 * mean['cost_usd']:.4g} per 1,000 images "
            f"({summary.accelerator or 'CPU only'}; prices: see {summary.manifest}), "
            f"{mean['flops_total'] / 1e9:.3g} GFLOP vs {mean['flops_total_unpruned'] / 1e9:.3g} with every visual token "
            f"({mean['flops_total_unpruned'] / mean['flops_total']:.2f}x), "
            f"KV cache {mean['kv_cache_bytes'] / 1e6:.3g} MB vs {mean['kv_cache_bytes_unpruned'] / 1e6:.3g} MB"
        )
    if summary.bound_by:
        busy = ", ".join(f"{name.removesuffix('_stage')} {b['per_actor']:.1f}" for name, b in summary.stage_busy_seconds.items())
        print(f"busy seconds per actor: {busy}; the run was bound by the {summary.bound_by}")
    for name, t in summary.tasks.items():
        parts = [f"{t['answered']} answered", f"{t['errors']} errors" + (f" ({t['errors_by_kind']})" if t["errors"] else "")]
        if "labels" in t:
            parts.append("labels " + ", ".join(f"{k} {v}" for k, v in t["labels"].items()))
        if t.get("valid_rate") is not None:
            parts.append(f"valid {100 * t['valid_rate']:.1f} %")
        print(f"task {name} ({t['type']}): {'; '.join(parts)}")
    for ex in summary.examples:
        if "answer" not in ex:  # a task spec: each task's answer (or error)
            print(f"  {ex['id']}: " + (ex["error"] or "; ".join(f"{k} = {v}" for k, v in ex.items() if k not in ("id", "error"))))
            continue
        said = ex["error"] or repr(ex["answer"])
        label = f"  (expected {ex['expected']!r})" if "expected" in ex else ""
        print(f"  {ex['id']}: {ex['prompt'].splitlines()[0] if ex['prompt'] else '<no prompt>'} -> {said}{label}")
    for name, s in summary.task_scores.items():
        print(f"task {name} against the shapes labels: {s['metric']} {100 * s['value']:.1f} % over {s['rows']} images")
    if summary.accuracy is not None:
        print(f"accuracy against `expected` (short answers, exact match): {100 * summary.accuracy:.1f} %")
    if summary.caption_f1 is not None:
        print(f"caption object F1 against `expected`: {100 * summary.caption_f1:.1f} %")
    return 0 if not summary.missing_ids and not summary.duplicate_ids else 1


if __name__ == "__main__":
    sys.exit(main())
