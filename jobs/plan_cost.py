"""Plan what annotating a corpus costs: per method and budget, $ per 1,000 images, images/s per
GPU, wall time and total cost on G accelerators, and the saving against keeping every token.

    python jobs/plan_cost.py --model configs/llava-1.5-7b.yaml --accelerator h100-sxm \\
        --images 10000000 [--gpus 8] [--runs OUT_DIR ...] --out plans/llava-7b

Without --runs: estimates from the checkpoint's shapes (model.architecture, else model.path)
and configs/accelerators.yaml, at --budgets kept visual tokens, for keep-all (method `none`)
and the config's pruning method. With --runs: measured rows from finished runs (their output
and _manifest.json) too. Writes plan.csv, plan.md and plan.png under --out and prints the table.
Exit status 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.cost import planner  # noqa: E402
from pipeline.cost.accounting import accelerator_price  # noqa: E402
from pipeline.cost.prices import load_accelerators, load_prices  # noqa: E402
from pipeline.models import model_shapes  # noqa: E402
from pipeline.models.tiny import resolve_model_path  # noqa: E402


# Estimate assumptions that can be overridden per plan (defaults: configs/accelerators.yaml).
ASSUMPTION_FLAGS = {
    "vision_mfu": float, "prefill_mfu": float, "decode_bandwidth": float,
    "decode_batch": int, "generated_tokens": int, "text_tokens": int,
}
args_source = "default from the accelerator table"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="job config YAML naming the model (and its pruning method)")
    p.add_argument("--accelerator", required=True, help="a key of the accelerator and price tables")
    p.add_argument("--images", type=int, required=True, help="corpus size")
    p.add_argument("--gpus", type=int, default=1, help="accelerators to plan for (default 1)")
    p.add_argument("--runs", nargs="*", default=[], help="finished runs' output directories (local or s3://)")
    p.add_argument("--out", required=True, type=Path, help="directory for plan.csv, plan.md, plan.png")
    p.add_argument("--budgets", default="576,192,128,64", help="kept visual tokens to estimate (comma-separated)")
    p.add_argument("--accelerators", default="configs/accelerators.yaml", help="accelerator table (YAML)")
    p.add_argument("--no-estimates", action="store_true", help="measured rows only")
    for name, kind in ASSUMPTION_FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"override assumptions.{name} ({args_source})")
    args = p.parse_args(argv)
    try:
        if args.images < 1 or args.gpus < 1:
            raise ConfigError("--images and --gpus must be >= 1")
        cfg = load_config(args.model)
        table = load_accelerators(args.accelerators)
        prices = load_prices(cfg.cost.prices)
        if args.accelerator not in table.accelerators:
            raise ConfigError(f"--accelerator {args.accelerator!r} is not in {args.accelerators}; "
                              f"known: {', '.join(sorted(table.accelerators))}")
        price = accelerator_price(prices, args.accelerator)
        overrides = {k: getattr(args, k) for k in ASSUMPTION_FLAGS if getattr(args, k) is not None}
        assume = table.assumptions.model_copy(update=overrides)
        budgets = sorted({int(b) for b in args.budgets.split(",")}, reverse=True)
        rows: list[planner.PlanRow] = []
        if not args.no_estimates:
            source = cfg.model.architecture or resolve_model_path(cfg.model.path)
            try:
                shapes = model_shapes(source, cfg.model.family)
            except (OSError, ValueError) as e:
                raise ConfigError(f"model.architecture / model.path {source!r}: cannot read the checkpoint's config "
                                  f"({e}); offline, point model.architecture at a directory holding its config.json")
            name = planner.model_label(cfg.model.path)
            n_visual = shapes.vision.patches
            for keep in budgets:
                method = "none" if keep >= n_visual else cfg.pruning.method
                rows.append(planner.estimate(
                    shapes, model=name, method=method, keep=keep, accelerator_name=args.accelerator,
                    accelerator=table.accelerators[args.accelerator], price=price, assume=assume,
                    images=args.images, gpus=args.gpus,
                ))
        for run in args.runs:
            try:
                rows.append(planner.measured(run, images=args.images, gpus=args.gpus))
            except (OSError, KeyError, ValueError) as e:
                raise ConfigError(f"--runs {run}: not a finished run with a manifest ({type(e).__name__}: {e})") from e
        if not rows:
            raise ConfigError("nothing to plan: give --runs or drop --no-estimates")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    planner.add_savings(rows)
    notes = planner.assumption_notes(assume, args.accelerator, table.accelerators[args.accelerator], price)
    planner.write_plan(rows, args.out, images=args.images, gpus=args.gpus, notes=notes)
    print(f"Cost plan for {args.images:,} images on {args.gpus} x {args.accelerator} "
          f"(estimates are labelled; assumptions in {args.out / 'plan.md'})")
    print(planner.table(rows))
    print(f"wrote {args.out / 'plan.csv'}, {args.out / 'plan.md'}, {args.out / 'plan.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
