"""Pruning quality: run the job over a grid of methods and budgets, score each run's answers.

Every grid cell is one ordinary run of the job (``pipeline.job.run_job``: same stages, same
output schema, its own manifest) into ``<out>/runs/<cell>/``; one Ray instance serves them all.
The vision encoder therefore runs once per cell: reusing it would need a second code path
through the stages, and on the models this is measured on it is a minority of the run's time.

Scores, per cell, from the output Parquet alone (so anyone can recompute them):
- with labels (column ``expected``; the rules of ``pipeline.quality.scoring``): ``accuracy``, normalised exact
  match over the short-answer rows (every row but the captions: the job summary's rule), its
  relative performance against keep-all (the paper's "Rel. Perf."), accuracy per short
  ``question_type``, and for ``caption`` rows the shapes world's object precision / recall / F1
  and order accuracy;
- always, against the keep-all answer of the same id: ``agreement``, normalised exact match over
  the short rows, and over the long rows (``agreement.is_long``: captions) the mean ROUGE-L and
  semantic similarity (``agreement.text_agreement``): "how much do my captions change";
  mean visual tokens kept; from the cost columns, $ per 1,000 images, FLOPs per image and the
  savings against keep-all.
Rows with an ``error`` count as wrong and as disagreeing (score 0), and are counted.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, JobConfig, validate_config
from pipeline.io.storage import locate
from pipeline.pruning import per_image_stats
from pipeline.quality.agreement import is_long, text_agreement
from pipeline.quality.scoring import caption_scores, is_caption, is_correct, label_scores, normalise

KEEP_ALL = "none"


@dataclass(frozen=True)
class Cell:
    """One grid point: a registry method, a budget, ResPrune's alpha (None: the config's), and for
    an adaptive budget its energy (pipeline.pruning.energy; ``keep`` is then its cap), floor and
    weighting (None: the config's)."""

    method: str
    keep: int | None  # None: keep-all
    alpha: float | None = None
    energy: float | None = None
    min_keep: int | None = None
    weighting: str | None = None

    @property
    def label(self) -> str:
        """The line the cell belongs to in the table and chart: fixed budgets of a method form one,
        adaptive ones another."""
        opts = [] if self.alpha is None else [f"alpha={self.alpha:g}"]
        if self.energy is not None:
            opts.append("energy" if self.weighting != "gated" else "energy, gated")
            opts += [] if self.min_keep is None else [f"min {self.min_keep}"]
        return self.method if not opts else f"{self.method} ({', '.join(opts)})"

    @property
    def slug(self) -> str:
        alpha = "" if self.alpha is None else f"-alpha{self.alpha:g}"
        energy = "" if self.energy is None else f"-energy{self.energy:g}"
        energy += "" if self.min_keep is None else f"-min{self.min_keep}"
        energy += "-gated" if self.weighting == "gated" else ""
        return f"{self.method}{alpha}{energy}-{'all' if self.keep is None else self.keep}"


CELL_OPTIONS = ("alpha", "energy", "cap", "min", "weighting")


def parse_grid(methods: str, budgets: str) -> list[Cell]:
    """``"none,resprune,resprune:alpha=0,random,resprune:energy=0.999"`` x ``"192,128,64"`` ->
    cells; keep-all comes first, once, whether or not it was named (every other cell is compared
    with it). A method runs at every budget; with ``energy=E`` it is one adaptive cell instead,
    capped at ``cap=N`` (default: the largest budget), with ``min=N`` and ``weighting=plain|gated``
    (default: the config's). Options are separated by ``:``."""
    try:
        keeps = sorted({int(b) for b in budgets.split(",") if b.strip()}, reverse=True)
    except ValueError as e:
        raise ConfigError(f"--keep: budgets must be integers, got {budgets!r}") from e
    if not keeps or min(keeps) < 1:
        raise ConfigError(f"--keep: give at least one budget >= 1, got {budgets!r}")
    from pipeline.pruning import ENERGY_TRACED, METHODS, WEIGHTINGS

    cells = [Cell(KEEP_ALL, None)]
    for token in (t.strip() for t in methods.split(",")):
        if not token or token == KEEP_ALL:
            continue
        name, *opts = token.split(":")
        if name not in METHODS:
            raise ConfigError(f"--methods: unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
        values: dict[str, str] = {}
        for opt in opts:
            key, _, value = opt.partition("=")
            if key not in CELL_OPTIONS or not value:
                raise ConfigError(f"--methods: {token!r}: options are {', '.join(f'{o}=...' for o in CELL_OPTIONS)}")
            values[key] = value
        try:
            alpha = float(values["alpha"]) if "alpha" in values else None
            energy = float(values["energy"]) if "energy" in values else None
            cap = int(values["cap"]) if "cap" in values else keeps[0]
            floor = int(values["min"]) if "min" in values else None
        except ValueError as e:
            raise ConfigError(f"--methods: {token!r}: alpha and energy take numbers, cap and min integers") from e
        weighting = values.get("weighting")
        if weighting is not None and weighting not in WEIGHTINGS:
            raise ConfigError(f"--methods: {token!r}: weighting is one of {', '.join(WEIGHTINGS)}")
        if energy is None:
            if {"cap", "min", "weighting"} & values.keys():
                raise ConfigError(f"--methods: {token!r}: cap, min and weighting go with energy=...")
            cells += [Cell(name, k, alpha) for k in keeps]
        else:
            if name not in ENERGY_TRACED:
                raise ConfigError(f"--methods: {token!r}: only {', '.join(sorted(ENERGY_TRACED))} has an energy trace")
            cells.append(Cell(name, cap, alpha, energy, floor, weighting))
    return cells


def cell_config(base: JobConfig, cell: Cell, input_path: str, output_path: str) -> JobConfig:
    """The job config of one cell: the base config with input, output and pruning replaced."""
    pruning: dict[str, Any] = {"method": cell.method, "energy": cell.energy}
    if cell.keep is not None:
        pruning |= {"keep": cell.keep, "prune_ratio": None}
    if cell.alpha is not None:
        pruning["alpha"] = cell.alpha
    if cell.min_keep is not None:
        pruning["min_keep"] = cell.min_keep
    if cell.weighting is not None:
        pruning["energy_weighting"] = cell.weighting
    raw = base.model_dump(mode="json")
    raw["input"]["path"] = input_path
    raw["input"]["create_sample_rows"] = None
    raw["output"].update({"path": output_path, "mode": "overwrite"})
    raw["pruning"].update(pruning)
    return validate_config(raw, source=f"evaluation cell {cell.slug}")


RUN_COLUMNS = ("id", "answer", "error", "visual_tokens_in", "visual_tokens_kept", "cost_usd", "flops_total")


def read_run(path: str) -> list[dict[str, Any]]:
    """The columns scoring needs from one run's output (labels when present)."""
    ds = locate(path).parquet_dataset()
    names = set(ds.schema.names)
    columns = [c for c in (*RUN_COLUMNS, "energy_explained", "expected", "question_type") if c in names]
    return sorted(ds.to_table(columns=columns).to_pylist(), key=lambda r: r["id"])


@dataclass
class EvalRow:
    method: str  # label (Cell.label): registry method, plus alpha and "energy" when set per cell
    keep: int  # configured budget (keep-all: visual tokens in; adaptive: the cap)
    energy: float | None  # adaptive budget's energy level; None for a fixed budget
    run: str
    rows: int
    error_rows: int
    short_rows: int  # scored by exact match
    long_rows: int  # captions: scored by objects (labels) and by ROUGE-L / semantic agreement
    accuracy: float | None  # short rows, exact match; None without labels or short rows
    relative: float | None  # accuracy / keep-all accuracy
    caption_precision: float | None  # labelled captions: object-level, micro over all objects
    caption_recall: float | None
    caption_f1: float | None
    caption_order_accuracy: float | None  # captions naming exactly the label's objects in its order
    agreement: float | None  # short rows: answers equal (normalised) to keep-all's, same id
    agreement_rouge_l: float | None  # long rows: mean ROUGE-L F against keep-all's answer
    agreement_semantic: float | None  # long rows: mean MiniLM cosine against keep-all's answer
    mean_tokens_kept: float
    tokens_kept_p50: float | None
    tokens_kept_p90: float | None
    energy_explained: float | None  # mean over answered rows (methods with an energy trace)
    flops_per_image: float | None
    usd_per_1k_images: float | None
    cost_saving_vs_keep_all: float | None = None
    flops_saving_vs_keep_all: float | None = None
    per_type: dict[str, float] = field(default_factory=dict)  # short types: accuracy
    cell: Cell | None = field(default=None, repr=False)  # the grid point (not a CSV column)


def score(cell: Cell, run: str, rows: list[dict[str, Any]], reference: list[dict[str, Any]]) -> EvalRow:
    """One cell's scores; ``reference``: the keep-all run's rows (the cell itself for keep-all)."""
    ref_answer = {r["id"]: r["answer"] for r in reference if not r["error"]}
    ok = [r for r in rows if not r["error"]]
    labelled = bool(rows) and all(r.get("expected") is not None for r in rows)

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    # Agreement: the same long/short split for every cell (it reads keep-all's answer, not the cell's).
    long_rows: list[dict[str, Any]] = []
    short_rows: list[dict[str, Any]] = []
    for r in rows:
        (long_rows if is_long(r, ref_answer.get(r["id"])) else short_rows).append(r)
    comparable = [r for r in long_rows if not r["error"] and r["id"] in ref_answer]
    text = text_agreement([(r["answer"], ref_answer[r["id"]]) for r in comparable])
    failed = [0.0] * (len(long_rows) - len(comparable))  # an error here or in keep-all: disagreement

    per_type: dict[str, list[bool]] = {}
    captions: dict[str, float | None] = {}
    if labelled and all(r.get("question_type") for r in rows):
        for r in rows:
            if not is_caption(r):
                per_type.setdefault(r["question_type"], []).append(is_correct(r))
        # The shapes world's scorer, over the captions its labels name objects of (none: all None).
        captions = caption_scores(rows)

    priced = [r["cost_usd"] for r in ok if r.get("cost_usd") is not None]
    flops = [r["flops_total"] for r in ok if r.get("flops_total") is not None]
    kept = per_image_stats([r["visual_tokens_kept"] for r in ok])
    return EvalRow(
        method=cell.label,
        keep=cell.keep if cell.keep is not None else round(mean([r["visual_tokens_in"] for r in ok]) or 0),
        energy=cell.energy,
        run=run,
        rows=len(rows),
        error_rows=len(rows) - len(ok),
        short_rows=len(short_rows),
        long_rows=len(long_rows),
        accuracy=label_scores(rows)["accuracy"] if labelled else None,
        relative=None,
        caption_precision=captions.get("precision"),
        caption_recall=captions.get("recall"),
        caption_f1=captions.get("f1"),
        caption_order_accuracy=captions.get("order_accuracy"),
        agreement=mean([float(not r["error"] and r["id"] in ref_answer
                              and normalise(ref_answer[r["id"]]) == normalise(r["answer"])) for r in short_rows]),
        agreement_rouge_l=mean(text["rouge_l"] + failed),
        agreement_semantic=mean(text["semantic"] + failed),
        mean_tokens_kept=mean([r["visual_tokens_kept"] for r in ok]) or 0.0,
        tokens_kept_p50=kept["p50"],
        tokens_kept_p90=kept["p90"],
        energy_explained=mean([r["energy_explained"] for r in ok if r.get("energy_explained") is not None]),
        flops_per_image=mean(flops),
        usd_per_1k_images=1000 * mean(priced) if priced else None,
        per_type={t: sum(v) / len(v) for t, v in sorted(per_type.items())},
        cell=cell,
    )


def add_relative(results: list[EvalRow]) -> None:
    """Relative performance and savings against the keep-all row (the first)."""
    base = next(r for r in results if r.method == KEEP_ALL)
    for r in results:
        if r.accuracy is not None and base.accuracy:
            r.relative = r.accuracy / base.accuracy
        if r.usd_per_1k_images is not None and base.usd_per_1k_images:
            r.cost_saving_vs_keep_all = 1 - r.usd_per_1k_images / base.usd_per_1k_images
        if r.flops_per_image is not None and base.flops_per_image:
            r.flops_saving_vs_keep_all = 1 - r.flops_per_image / base.flops_per_image


def run_grid(base: JobConfig, cells: list[Cell], input_path: str, out: Path, *, match_fixed: bool = False) -> list[EvalRow]:
    """Run every cell through the job, then score each against the keep-all run. ``match_fixed``:
    then, for each adaptive cell, run its method at the fixed budget nearest its mean tokens kept
    (``matched_pairs`` pairs them), unless the grid has that cell already."""
    from pipeline.job import run_job

    if base.tasks:  # its scores read one answer per row
        raise ConfigError("tasks: the evaluation grid compares each row's one answer across budgets; give it a "
                          "config without tasks (the row's prompt column), e.g. one question per row")
    runs: dict[Cell, str] = {}
    outputs: dict[Cell, list[dict[str, Any]]] = {}  # each run's output, read once

    def run(cell: Cell) -> None:
        path = str(out / "runs" / cell.slug)
        summary = run_job(cell_config(base, cell, input_path, path))
        # Not output rows against input rows: input.id_policy: drop_duplicates leaves fewer rows
        # out than in, by design. What must hold is one output row per kept id.
        if summary.missing_ids or summary.duplicate_ids:
            raise RuntimeError(
                f"cell {cell.slug}: {summary.missing_ids} ids missing from the output and {summary.duplicate_ids} "
                f"duplicated ({summary.expected_rows} expected, {summary.output_rows} written): see {path}")
        runs[cell] = path
        outputs[cell] = read_run(path)

    for cell in cells:
        run(cell)
    if match_fixed:
        for cell in [c for c in cells if c.energy is not None]:
            tokens = [r["visual_tokens_kept"] for r in outputs[cell] if not r["error"]]
            fixed = Cell(cell.method, max(1, round(sum(tokens) / len(tokens))) if tokens else cell.keep, cell.alpha)
            if fixed not in runs:
                run(fixed)
    results = [score(cell, path, outputs[cell], outputs[cells[0]]) for cell, path in runs.items()]
    add_relative(results)
    return results


def matched_pairs(results: list[EvalRow]) -> list[tuple[EvalRow, EvalRow]]:
    """(adaptive, fixed) per adaptive row: the same method and alpha at the fixed budget nearest
    its mean tokens kept (within 1 token); adaptive rows without one are left out."""
    pairs = []
    for a in (r for r in results if r.cell is not None and r.cell.energy is not None):
        fixed = [r for r in fixed_curve(results, a) if abs(r.keep - a.mean_tokens_kept) <= 1]
        if fixed:
            pairs.append((a, min(fixed, key=lambda r: abs(r.keep - a.mean_tokens_kept))))
    return pairs


def fixed_curve(results: list[EvalRow], adaptive: EvalRow) -> list[EvalRow]:
    """The fixed-budget rows of an adaptive row's method and alpha."""
    a = adaptive.cell
    return [r for r in results if r.cell is not None and r.cell.energy is None and r.cell.keep is not None
            and (r.cell.method, r.cell.alpha) == (a.method, a.alpha)]


def fixed_tokens_for(score: float, fixed: list[EvalRow], attr: str = "accuracy") -> float | None:
    """Tokens a fixed budget needs to reach ``score``: linear between the two budgets around the
    first crossing of the fixed curve (sorted by tokens kept); None when it never reaches it."""
    points = sorted((r.mean_tokens_kept, getattr(r, attr)) for r in fixed if getattr(r, attr) is not None)
    for (t0, s0), (t1, s1) in zip(points, points[1:]):
        if s0 >= score:
            return t0
        if s1 >= score:
            return t0 + (t1 - t0) * (score - s0) / (s1 - s0)
    return points[-1][0] if points and points[-1][1] >= score else None


def matched_table(results: list[EvalRow]) -> str:
    """Adaptive against fixed at matched mean tokens, and the fixed tokens for the adaptive's
    accuracy (interpolated on the fixed curve of the same method); empty without pairs."""
    pairs = matched_pairs(results)
    if not pairs:
        return ""
    head = ["adaptive", "energy", "cap", "tokens kept (mean / p50 / p90)", "accuracy", "fixed keep", "fixed accuracy",
            "difference", "fixed tokens for the same accuracy", "adaptive $/1k", "fixed $/1k"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a, f in pairs:
        need = fixed_tokens_for(a.accuracy, fixed_curve(results, a)) if a.accuracy is not None else None
        diff = None if a.accuracy is None or f.accuracy is None else a.accuracy - f.accuracy
        lines.append("| " + " | ".join([
            a.method, f"{a.energy:g}", str(a.keep), f"{a.mean_tokens_kept:.1f} / {a.tokens_kept_p50:g} / {a.tokens_kept_p90:g}",
            _pct(a.accuracy), str(f.keep), _pct(f.accuracy), "-" if diff is None else f"{100 * diff:+.1f} pts",
            "-" if need is None else f"{need:.1f}",
            "-" if a.usd_per_1k_images is None else f"{a.usd_per_1k_images:.4g}",
            "-" if f.usd_per_1k_images is None else f"{f.usd_per_1k_images:.4g}",
        ]) + " |")
    return "\n".join(lines)


CSV_COLUMNS = [f.name for f in fields(EvalRow) if f.name not in ("per_type", "cell")]


def question_types(results: list[EvalRow]) -> list[str]:
    return sorted({t for r in results for t in r.per_type})


def write_csv(results: list[EvalRow], path: Path) -> None:
    types = question_types(results)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS + [f"accuracy_{t}" for t in types])
        w.writeheader()
        for r in results:
            row = {k: getattr(r, k) for k in CSV_COLUMNS}
            row.update({f"accuracy_{t}": r.per_type.get(t) for t in types})
            w.writerow(row)


def _has(results: list[EvalRow], name: str) -> bool:
    return any(getattr(r, name) is not None for r in results)


def table(results: list[EvalRow]) -> str:
    """The markdown table; a group of columns only where some cell has its scores."""
    types = question_types(results)
    columns: list[tuple[str, Any]] = [
        ("method", lambda r: r.method), ("keep", lambda r: str(r.keep)),
        ("tokens kept", lambda r: f"{r.mean_tokens_kept:.1f}"),
    ]
    if _has(results, "energy"):
        columns += [("energy", lambda r: "-" if r.energy is None else f"{r.energy:g}"),
                    ("kept p50 / p90", lambda r: f"{r.tokens_kept_p50:g} / {r.tokens_kept_p90:g}"
                     if r.tokens_kept_p50 is not None else "-"),
                    ("energy explained", lambda r: "-" if r.energy_explained is None else f"{r.energy_explained:.5f}")]
    if _has(results, "accuracy"):
        columns += [("accuracy", lambda r: _pct(r.accuracy)), ("rel. perf.", lambda r: _pct(r.relative))]
        columns += [(t, lambda r, t=t: _pct(r.per_type.get(t))) for t in types]
    if _has(results, "caption_f1"):
        columns += [("caption F1", lambda r: _pct(r.caption_f1)), ("caption P", lambda r: _pct(r.caption_precision)),
                    ("caption R", lambda r: _pct(r.caption_recall)),
                    ("caption order", lambda r: _pct(r.caption_order_accuracy))]
    if _has(results, "agreement"):
        columns.append(("agreement", lambda r: _pct(r.agreement)))
    if _has(results, "agreement_rouge_l"):
        columns += [("ROUGE-L", lambda r: _pct(r.agreement_rouge_l)), ("semantic", lambda r: _pct(r.agreement_semantic))]
    columns += [
        ("errors", lambda r: str(r.error_rows)),
        ("$/1k img", lambda r: "-" if r.usd_per_1k_images is None else f"{r.usd_per_1k_images:.4g}"),
        ("cost saving", lambda r: _pct(r.cost_saving_vs_keep_all)),
        ("FLOPs saving", lambda r: _pct(r.flops_saving_vs_keep_all)),
    ]
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in results]
    return "\n".join(lines)


def markdown(results: list[EvalRow], *, corpus: str, command: str) -> str:
    n = results[0].rows if results else 0
    long_n = results[0].long_rows if results else 0
    what = []
    if _has(results, "accuracy"):
        what.append("accuracy = normalised exact match against `expected` over the short-answer rows (all but "
                    "captions); rel. perf. = accuracy / keep-all accuracy; per-type columns: accuracy per "
                    "`question_type`")
    else:
        what.append("no `expected` column: agreement with the keep-all answers only")
    if _has(results, "caption_f1"):
        what.append("caption F1 / P / R = object-level (colour, shape) F1, precision and recall against the label, "
                    "micro over all objects; caption order = captions naming exactly the label's objects in order")
    if _has(results, "agreement"):
        what.append("agreement = short rows giving the same normalised answer as keep-all")
    if _has(results, "agreement_rouge_l"):
        what.append(f"ROUGE-L / semantic = mean over the {long_n} long rows (captions) of the ROUGE-L F-measure and "
                    "of the all-MiniLM-L6-v2 cosine against keep-all's answer (1 = unchanged; README, Quality, reads "
                    "them on example caption pairs)")
    if _has(results, "energy"):
        what.append("energy = an adaptive budget's level (pipeline/pruning/energy.py), keep = its cap, kept p50 / p90 "
                    "= the per-image distribution, energy explained = mean share of the token energy the kept tokens "
                    "span")
    what.append("error rows score 0 everywhere; savings from the runs' own cost columns ($: measured stage time x "
                "reserved resources at the price table; FLOPs: analytic)")
    matched = matched_table(results)
    extra = ["## Adaptive against fixed budgets at matched mean tokens", "",
             "Each adaptive cell beside its method's fixed budget at the nearest whole number of tokens to its mean; "
             "the fixed tokens for the same accuracy are interpolated on the fixed budgets' curve.", "",
             matched, ""] if matched else []
    return "\n".join([
        "# Pruning quality and cost", "",
        f"Corpus: `{corpus}` ({n} rows, {long_n} long). Command: `{command}`.", "",
        "; ".join(what) + ".", "",
        table(results), "", *extra, "![quality against cost](eval.png)", "",
    ])


def _headline(results: list[EvalRow]) -> tuple[str, str]:
    """The score of the tokens and $ panels: accuracy with labels, else exact-match agreement, else
    (a corpus of captions only) ROUGE-L agreement."""
    if _has(results, "accuracy"):
        return "accuracy", "accuracy"
    if _has(results, "agreement"):
        return "agreement", "agreement with keep-all"
    return "agreement_rouge_l", "caption ROUGE-L vs keep-all"


def chart(results: list[EvalRow], path: Path) -> None:
    """One line per method, keep-all a star with a grey reference line: the headline score against
    visual tokens kept and against $ per 1,000 images; with adaptive budgets, the same score zoomed
    on them (log tokens, the score's own range: adaptive lines dotted with squares, each point
    labelled with its energy level, beside the fixed budgets of the same method); then, against
    tokens, caption F1 (labelled captions) and caption ROUGE-L and semantic agreement with keep-all
    (any captions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline, name = _headline(results)

    def tokens(r: EvalRow) -> float:
        return r.mean_tokens_kept

    # (x label, x, score, y label, zoomed on the adaptive budgets)
    panels: list[tuple[str, Any, str, str, bool]] = [("visual tokens kept per image", tokens, headline, name, False)]
    if all(r.usd_per_1k_images is not None for r in results):
        panels.append(("$ per 1,000 images (measured)", lambda r: r.usd_per_1k_images, headline, name, False))
    adaptive_rows = [r for r in results if r.energy is not None]
    if adaptive_rows:
        panels.append(("visual tokens kept per image (mean; log scale)", tokens, headline,
                       f"{name}: adaptive vs fixed", True))
    if _has(results, "caption_f1"):
        panels.append(("visual tokens kept per image", tokens, "caption_f1", "caption F1 (objects, labels)", False))
    for attr, label in (("agreement_rouge_l", "caption ROUGE-L vs keep-all"),
                        ("agreement_semantic", "caption semantic sim. vs keep-all")):
        if _has(results, attr) and attr != headline:
            panels.append(("visual tokens kept per image", tokens, attr, label, False))
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.2 * nrows), squeeze=False)
    lines: dict[str, list[EvalRow]] = {}
    for r in results:
        lines.setdefault(r.method, []).append(r)
    adaptive_methods = {r.cell.method for r in adaptive_rows if r.cell is not None}
    for ax, (xlabel, x, attr, ylabel, zoom) in zip(axes.flat, panels, strict=False):
        def y(r: EvalRow, attr: str = attr) -> float:
            return 100 * getattr(r, attr)

        shown: list[float] = []
        for method, members in lines.items():
            members = sorted((m for m in members if getattr(m, attr) is not None), key=x)
            if not members:
                continue
            if method == KEEP_ALL:
                ax.axhline(y(members[0]), color="grey", linewidth=1)
                if not zoom:
                    ax.plot([x(m) for m in members], [y(m) for m in members], "*", markersize=13, color="black",
                            label="keep all")
                continue
            adaptive = members[0].energy is not None
            if zoom:  # the adaptive lines and the fixed budgets of their methods, over the adaptive range
                if not adaptive and (members[0].cell is None or members[0].cell.method not in adaptive_methods
                                     or members[0].cell.alpha is not None):
                    continue
                if not adaptive:
                    top = 1.5 * max(tokens(r) for r in adaptive_rows)
                    members = [m for m in members if x(m) <= top] or members[:1]
            style = ":" if adaptive else "--" if "alpha=" in method else "-"
            ax.plot([x(m) for m in members], [y(m) for m in members], marker="s" if adaptive else "o",
                    linestyle=style, label=method)
            shown += [y(m) for m in members]
            for m in members if adaptive and zoom else []:  # each adaptive point says its level
                ax.annotate(f"{m.energy:g}", (x(m), y(m)), textcoords="offset points", xytext=(3, 5), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{ylabel} (%)")
        if zoom:
            ax.set_xscale("log")
            ax.set_ylim(min(shown) - 2, max(shown) + 2)
            ax.set_title("points: mean tokens kept; labels: energy level", fontsize=8)
        else:
            ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"Pruning: quality against budget and cost ({results[0].rows} rows)" if results else "")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: list[EvalRow], out: Path, *, corpus: str, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(results, out / "eval.csv")
    (out / "eval.md").write_text(markdown(results, corpus=corpus, command=command))
    chart(results, out / "eval.png")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"
