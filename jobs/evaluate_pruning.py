"""Score pruning methods and budgets by quality and cost on a corpus, through the real job.

    python jobs/evaluate_pruning.py --config configs/local.yaml --input data/heldout \\
        [--methods none,resprune,resprune:alpha=0,divprune,score_topk,random] [--keep 192,128,64] --out eval/
    python jobs/evaluate_pruning.py ... --methods resprune,resprune:energy=0.999,resprune:energy=0.9999 --match-fixed

Each grid cell (keep-all first, then every method at every budget) is one run of the job into
OUT/runs/<cell>/; the scores are read back from those runs' Parquet. Writes OUT/eval.csv,
OUT/eval.md and OUT/eval.png and prints the table.

Labels are optional. With an `expected` column: short-answer accuracy (exact match) per method,
budget and question type, and for shapes-world captions object precision / recall / F1. With or
without labels: how far each cell's answers moved from keep-all's, exact match for short
answers and ROUGE-L and semantic similarity for captions (pipeline/quality/agreement.py), next
to the $ and FLOPs saved: point --input at a few shards of your own corpus to read "how much do
my captions change at 128 or 64 tokens, and what do I save". `--sample-rows N --seed S` writes
a labelled shapes-world corpus of N rows at --input first when --input does not exist.
Adaptive budgets (pipeline/pruning/energy.py): `resprune:energy=E` is one cell whose per-image
budget explains E of each image's token energy, capped at the largest --keep (or `:cap=N`), with
`:min=N` and `:weighting=plain|gated` to override the config's. It sits on the same axes as the
fixed budgets, at its mean tokens kept. --match-fixed also runs each adaptive cell's method at the
fixed budget nearest its mean tokens kept and tables the pairs (eval.md): is the adaptive budget
more accurate at the same mean tokens, and how many tokens does a fixed one need for its accuracy.
Exit status 2 on a configuration error, 1 if a run failed or its output misses or repeats an id.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.io.storage import is_uri  # noqa: E402
from pipeline import evaluation  # noqa: E402

DEFAULT_METHODS = "none,resprune,resprune:alpha=0,divprune,score_topk,random"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="base job config (model, stages, generation)")
    p.add_argument("--input", help="corpus to evaluate (default: the config's input.path)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated registry methods; `method:alpha=X` sets alpha for that line; "
                   "`resprune:energy=E[:cap=N][:min=N][:weighting=plain|gated]` is an adaptive budget")
    p.add_argument("--keep", default="192,128,64", help="budgets: visual tokens kept (comma-separated)")
    p.add_argument("--match-fixed", action="store_true",
                   help="also run each adaptive cell's method at the fixed budget nearest its mean tokens kept")
    p.add_argument("--out", required=True, type=Path, help="directory for runs/, eval.csv, eval.md, eval.png")
    p.add_argument("--sample-rows", type=int, help="write a labelled shapes-world corpus of this many rows at --input "
                   "first, if --input is a missing local directory")
    p.add_argument("--seed", type=int, default=4242, help="world seed of --sample-rows (never a training seed)")
    p.add_argument("--sample-types", help="question types --sample-rows draws, comma-separated (default: the "
                   "world's short types; add `caption` for captions)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        base = load_config(args.config)
        corpus = args.input or base.input.path
        if args.sample_rows and not is_uri(corpus) and not Path(corpus).exists():
            from pipeline.tiny.shapes_world import DEFAULT_TYPES, parse_types, write_corpus

            try:
                types = parse_types(args.sample_types) if args.sample_types else DEFAULT_TYPES
            except ValueError as e:
                raise ConfigError(f"--sample-types: {e}") from e
            write_corpus(corpus, rows=args.sample_rows, shards=max(1, args.sample_rows // 100), seed=args.seed,
                         types=types)
        cells = evaluation.parse_grid(args.methods, args.keep)
        results = evaluation.run_grid(base, cells, corpus, args.out, match_fixed=args.match_fixed)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"evaluation failed: {e}", file=sys.stderr)
        return 1
    command = "python jobs/evaluate_pruning.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    evaluation.write_report(results, args.out, corpus=corpus, command=command)
    print(evaluation.table(results))
    matched = evaluation.matched_table(results)
    if matched:
        print("\nAdaptive against fixed at matched mean tokens:\n" + matched)
    print(f"wrote {args.out / 'eval.csv'}, {args.out / 'eval.md'}, {args.out / 'eval.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
