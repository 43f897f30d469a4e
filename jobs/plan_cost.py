"""Plan what annotating a corpus costs: per method and budget, $ per 1,000 images, images/s per
GPU, wall time and total cost on G accelerators, and the saving against keeping every token.

    python jobs/plan_cost.py --model configs/llava-1.5-7b.yaml --accelerator h100-sxm \\
        --images 10000000 [--gpus 8] [--engine vllm|hf] [--generated-tokens N] [--runs OUT_DIR ...] \\
        [--tasks configs/tasks/shapes.yaml | --tasks-per-image 4] --out plans/llava-7b

Without --runs: estimates from the checkpoint's shapes (model.architecture, else model.path)
and configs/accelerators.yaml, for one --image-size image (what it costs in visual tokens and
encoder patches follows the family: fixed for LLaVA-1.5, tiles for LLaVA-NeXT, pixels for
Qwen2.5-VL within model.min_pixels / max_pixels), at each of --budgets (counts, or prune ratios
such as 77.8%, by the job's own budget rule), for keep-all (method `none`) and the config's
pruning method, decoded by --engine (default vllm, what the cluster configs run: continuous
batching, an image pays for its own generated tokens; hf: static batches that run until their
longest row stops, generation.max_new_tokens). With --runs: measured rows from finished runs
(their output and _manifest.json) too, each with the engine its run used. Every row states its
decode engine. A run with an adaptive budget (pruning.energy) also gives an estimate row for the
planned model with each image keeping the share of its tokens the run's images kept (its
distribution, not its mean), labelled "estimate, kept tokens: distribution of RUN".

The CPU side: every estimate row also gives the preparation stage's CPU ms for an --image-size
image (from --cpu-table, configs/cpu_prepare.yaml, measured with its date and machine; sizes in
between interpolated in pixel count), the CPU cores that keep one GPU fed at the row's images/s
per GPU, the images/s per GPU the config's prepare_stage allows at full size (max_pool_size x
min(num_cpus, 1) cores over the GPUs of the GPU pools at full size) and whether the plan is
CPU-bound (that rate below the GPU's). Measured rows leave them empty.

Generated tokens per image, the decode term's input (a caption corpus generates several times a
VQA one's): --generated-tokens N, else the mean over the answered rows of the --runs given, else
the accelerator table's assumption; every row and plan.md say which (column generated_tokens_from:
given / measured from runs / assumed).

Several tasks per image: a task spec (--tasks FILE, a YAML task list as configs/tasks/shapes.yaml,
validated like a config's tasks; else the --model config's own tasks:) or --tasks-per-image N
(N free-text tasks). Each task generates its max_new_tokens, else the figure above (column
generated_tokens: their sum per image; generated_tokens_from: "task spec" and/or the figure's
origin). Every estimate row is then the image encoded once (vision once, each task's prefill and
decode), next to the same questions as one row each (the image encoded once per task): columns
tasks_per_image, flops_per_image_per_row_questions, gpu_seconds_per_image_per_row_questions,
usd_per_1k_images_per_row_questions, encode_once_flops_saving, encode_once_saving. Without
either, one task per image (T = 1: the per-row columns equal the others, saving 0).
Writes plan.csv, plan.md and plan.png under --out and prints the table.
Exit status 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.cost import cpu_side, planner  # noqa: E402
from pipeline.cost.accounting import accelerator_price  # noqa: E402
from pipeline.cost.prices import load_accelerators, load_prices  # noqa: E402
from pipeline.engines import engine_names  # noqa: E402
from pipeline.models import detect_family, model_shapes, token_counts  # noqa: E402
from pipeline.pruning import budget  # noqa: E402
from pipeline.models.sources import resolve_model_path  # noqa: E402


# Estimate assumptions that can be overridden per plan (defaults: configs/accelerators.yaml).
ASSUMPTION_FLAGS = {
    "vision_mfu": float, "prefill_mfu": float, "decode_bandwidth": float, "decode_batch": int, "text_tokens": int,
}
args_source = "default from the accelerator table"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="job config YAML naming the model (and its pruning method)")
    p.add_argument("--accelerator", required=True, help="a key of the accelerator and price tables")
    p.add_argument("--images", type=int, required=True, help="corpus size")
    p.add_argument("--gpus", type=int, default=1, help="accelerators to plan for (default 1)")
    p.add_argument("--runs", nargs="*", default=[], help="finished runs' output directories (local or s3://)")
    p.add_argument("--out", required=True, type=Path, help="directory for plan.csv, plan.md, plan.png")
    p.add_argument("--budgets", default="0%,66.7%,77.8%,88.9%",
                   help="budgets to estimate, comma-separated: counts (128) or prune ratios (77.8%%); default: "
                   "keep-all and the paper's three ratios (576 -> 192, 128, 64 on LLaVA-1.5)")
    p.add_argument("--image-size", default="640x480",
                   help="WIDTHxHEIGHT of a typical corpus image, for families whose token count follows it "
                   "(default 640x480)")
    p.add_argument("--accelerators", default="configs/accelerators.yaml", help="accelerator table (YAML)")
    p.add_argument("--cpu-table", default=cpu_side.DEFAULT_TABLE,
                   help="CPU ms per image of the preparation stage by family and image size (YAML; default "
                   "%(default)s): the CPU cores per GPU and CPU-bound columns")
    p.add_argument("--engine", choices=engine_names(), default=planner.DEFAULT_ENGINE,
                   help="decode engine the estimates assume (default %(default)s: continuous batching, an image pays "
                   "for its own tokens; hf: static batches run to their longest row, generation.max_new_tokens); "
                   "measured rows always show their run's engine")
    p.add_argument("--no-estimates", action="store_true", help="measured rows only")
    p.add_argument("--generated-tokens", type=int, metavar="N",
                   help="mean generated tokens per image the estimates decode (e.g. 8 for short VQA answers, 128 "
                   "for long captions); default: the mean over the answered rows of --runs, else "
                   "assumptions.generated_tokens of the accelerator table")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--tasks", metavar="FILE",
                      help="a YAML task list (as configs/tasks/shapes.yaml; relative to the working directory, else "
                      "to --model's directory) asked of every image, replacing the config's tasks: plan the image "
                      "encoded once against one row per question; default: the config's tasks, if any")
    spec.add_argument("--tasks-per-image", type=int, metavar="N",
                      help="N free-text tasks per image, each generating the estimates' generated tokens (a task "
                      "spec without a file)")
    for name, kind in ASSUMPTION_FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"override assumptions.{name} ({args_source})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.images < 1 or args.gpus < 1:
            raise ConfigError("--images and --gpus must be >= 1")
        if args.generated_tokens is not None and args.generated_tokens < 1:
            raise ConfigError("--generated-tokens must be >= 1")
        if args.tasks_per_image is not None and args.tasks_per_image < 1:
            raise ConfigError("--tasks-per-image must be >= 1")
        cfg = load_config(args.model)
        tasks_source = f"the tasks of {args.model}" if cfg.tasks else None
        if args.tasks:
            try:  # validated as a config's tasks are, so errors name the task and field
                cfg = load_config(args.model, overrides={"tasks": args.tasks})
            except ConfigError as e:
                raise ConfigError(f"--tasks {args.tasks}: {str(e).removeprefix(f'invalid {args.model}: ')}") from None
            tasks_source = f"--tasks {args.tasks}"
        elif args.tasks_per_image is not None:
            tasks_source = f"--tasks-per-image {args.tasks_per_image}"
        table = load_accelerators(args.accelerators)
        prices = load_prices(cfg.cost.prices)
        if args.accelerator not in table.accelerators:
            raise ConfigError(f"--accelerator {args.accelerator!r} is not in {args.accelerators}; "
                              f"known: {', '.join(sorted(table.accelerators))}")
        price = accelerator_price(prices, args.accelerator)
        measured_rows: list[planner.PlanRow] = []
        for run in args.runs:
            try:
                measured_rows.append(planner.measured(run, images=args.images, gpus=args.gpus))
            except (OSError, KeyError, ValueError) as e:
                raise ConfigError(f"--runs {run}: not a finished run with a manifest ({type(e).__name__}: {e})") from e
        # Read after the runs were checked, so a bad run is named as such rather than by this.
        gen, gen_from, gen_note = planner.generated_tokens_for_estimates(
            args.generated_tokens, args.runs, table.assumptions.generated_tokens,
            per="task without its own max_new_tokens" if tasks_source else "image")
        cap = cfg.generation.max_new_tokens
        if args.tasks_per_image is not None:
            loads = [planner.TaskLoad(f"task{i + 1}", gen, gen_from, cap) for i in range(args.tasks_per_image)]
        elif cfg.tasks:
            loads = planner.task_loads(cfg.tasks, gen, gen_from, cap)
        else:
            loads = None  # one implicit task: the single-task plan
        overrides = {k: getattr(args, k) for k in ASSUMPTION_FLAGS if getattr(args, k) is not None}
        assume = table.assumptions.model_copy(update=overrides | {"generated_tokens": gen})
        try:
            budgets = planner.parse_budgets(args.budgets)
            width, height = (int(x) for x in args.image_size.lower().split("x"))
            if width < 1 or height < 1:
                raise ValueError
        except ValueError as e:
            what = str(e) if "budgets" in str(e) else f"--image-size {args.image_size!r}: want WIDTHxHEIGHT"
            raise ConfigError(what) from None
        image_note = state_note = cpu_note = cpu_table = family = prep_ms = None
        rows: list[planner.PlanRow] = []
        if not args.no_estimates:
            source = cfg.model.architecture or resolve_model_path(cfg.model.path)
            try:
                shapes = model_shapes(source, cfg.model.family)
            except (OSError, ValueError) as e:
                raise ConfigError(f"model.architecture / model.path {source!r}: cannot read the checkpoint's config "
                                  f"({e}); offline, point model.architecture at a directory holding its config.json")
            name = planner.model_label(cfg.model.path)
            n_visual, patches = token_counts(source, cfg.model, width, height, cfg.model.family)
            image_note = (f"Estimates are for {width}x{height} images: {n_visual} visual tokens per image unpruned, "
                          f"{patches} patches through the vision encoder.")
            state_note = planner.state_note(shapes)
            cpu_table = cpu_side.load_cpu_table(args.cpu_table)
            family = cfg.model.family if cfg.model.family != "auto" else detect_family(source)
            prep_ms = (cpu_side.prepare_ms(cpu_table, family, width, height)
                       if family in cpu_table.prepare_ms else None)
            kept_counts = sorted({budget(n_visual, keep=k, prune_ratio=r) for k, r in budgets}, reverse=True)
            for keep in kept_counts:
                method = "none" if keep >= n_visual else cfg.pruning.method
                rows.append(planner.estimate(
                    shapes, model=name, method=method, keep=keep, visual_tokens_in=n_visual, encoder_patches=patches,
                    accelerator_name=args.accelerator, accelerator=table.accelerators[args.accelerator], price=price,
                    assume=assume, images=args.images, gpus=args.gpus,
                    engine=args.engine, max_new_tokens=cfg.generation.max_new_tokens, generated_from=gen_from,
                    tasks=loads,
                ))
            for run in args.runs:  # a sample run's adaptive kept-token distribution, on the planned model
                adaptive = planner.adaptive_budget(run)
                if adaptive is None:
                    continue
                rows.append(planner.estimate_distribution(
                    planner.run_kept_shares(run), visual_tokens_in=n_visual, kept_from=f"distribution of {run} ({adaptive})",
                    shapes=shapes, model=name, method="resprune", encoder_patches=patches,
                    accelerator_name=args.accelerator, accelerator=table.accelerators[args.accelerator], price=price,
                    assume=assume, images=args.images, gpus=args.gpus,
                    engine=args.engine, max_new_tokens=cfg.generation.max_new_tokens, generated_from=gen_from,
                    tasks=loads,
                ))
        if prep_ms is not None:
            planner.add_cpu_side(rows, prep_ms, cpu_side.prepare_cores_per_gpu(cfg))
        if cpu_table is not None:
            cpu_note = planner.cpu_side_note(cpu_table.source(), args.cpu_table, family, f"{width}x{height}", prep_ms,
                                             cpu_side.prepare_cores(cfg), cpu_side.gpus_at_full_size(cfg))
        rows += measured_rows
        if not rows:
            raise ConfigError("nothing to plan: give --runs or drop --no-estimates")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    planner.add_savings(rows)
    notes = planner.assumption_notes(assume, args.accelerator, table.accelerators[args.accelerator], price,
                                     engine=args.engine, max_new_tokens=cfg.generation.max_new_tokens,
                                     generated_note=gen_note)
    tasks_note = (planner.tasks_note(loads, tasks_source, assume.text_tokens)
                  if loads is not None and not args.no_estimates else None)
    notes += [n for n in (image_note, state_note, tasks_note, cpu_note) if n]
    planner.write_plan(rows, args.out, images=args.images, gpus=args.gpus, notes=notes)
    print(f"Cost plan for {args.images:,} images on {args.gpus} x {args.accelerator} "
          f"(estimates are labelled and assume decode engine {args.engine}; assumptions in {args.out / 'plan.md'})")
    if not args.no_estimates:
        print(gen_note)
    if tasks_note:
        print(tasks_note)
    if cpu_note:
        print(cpu_note)
    if state_note:
        print(state_note)
    print(planner.table(rows))
    print(f"wrote {args.out / 'plan.csv'}, {args.out / 'plan.md'}, {args.out / 'plan.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
