"""Pruning quality: run the job over a grid of methods and budgets, score each run's answers.

Every grid cell is one ordinary run of the job (``pipeline.job.run_job``: same stages, same
output schema, its own manifest) into ``<out>/runs/<cell>/``; one Ray instance serves them all.
The vision encoder therefore runs once per cell: reusing it would need a second code path
through the stages, and on the models this is measured on it is a minority of the run's time.

Scores, per cell, from the output Parquet alone (so anyone can recompute them):
- with labels (column ``expected``): accuracy by normalised exact match (lower case, punctuation
  stripped, whitespace collapsed), relative performance against keep-all (the paper's
  "Rel. Perf."), and accuracy per ``question_type`` when that column exists;
- always: agreement with the keep-all answers, mean visual tokens kept, and, from the cost
  columns, $ per 1,000 images, FLOPs per image and the savings against keep-all.
Rows with an ``error`` count as wrong (and are counted).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, JobConfig, validate_config
from pipeline.io.storage import parquet_dataset

from .scoring import is_correct, normalise

KEEP_ALL = "none"


@dataclass(frozen=True)
class Cell:
    """One grid point: a registry method, a budget, and ResPrune's alpha (None: the config's)."""

    method: str
    keep: int | None  # None: keep-all
    alpha: float | None = None

    @property
    def label(self) -> str:
        return self.method if self.alpha is None else f"{self.method} (alpha={self.alpha:g})"

    @property
    def slug(self) -> str:
        alpha = "" if self.alpha is None else f"-alpha{self.alpha:g}"
        return f"{self.method}{alpha}-{'all' if self.keep is None else self.keep}"


def parse_grid(methods: str, budgets: str) -> list[Cell]:
    """``"none,resprune,resprune:alpha=0,random"`` x ``"192,128,64"`` -> cells; keep-all comes
    first, once, whether or not it was named (every other cell is compared with it)."""
    try:
        keeps = sorted({int(b) for b in budgets.split(",") if b.strip()}, reverse=True)
    except ValueError as e:
        raise ConfigError(f"--keep: budgets must be integers, got {budgets!r}") from e
    if not keeps or min(keeps) < 1:
        raise ConfigError(f"--keep: give at least one budget >= 1, got {budgets!r}")
    from pipeline.pruning import METHODS

    cells = [Cell(KEEP_ALL, None)]
    for token in (t.strip() for t in methods.split(",")):
        if not token or token == KEEP_ALL:
            continue
        name, _, opts = token.partition(":")
        if name not in METHODS:
            raise ConfigError(f"--methods: unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
        alpha = None
        if opts:
            key, _, value = opts.partition("=")
            if key != "alpha":
                raise ConfigError(f"--methods: {token!r}: the only option is alpha=<float>")
            try:
                alpha = float(value)
            except ValueError as e:
                raise ConfigError(f"--methods: {token!r}: alpha must be a number") from e
        cells += [Cell(name, k, alpha) for k in keeps]
    return cells


def cell_config(base: JobConfig, cell: Cell, input_path: str, output_path: str) -> JobConfig:
    """The job config of one cell: the base config with input, output and pruning replaced."""
    pruning = {"method": cell.method}
    if cell.keep is not None:
        pruning |= {"keep": cell.keep, "prune_ratio": None}
    if cell.alpha is not None:
        pruning["alpha"] = cell.alpha
    raw = base.model_dump(mode="json")
    raw["input"]["path"] = input_path
    raw["input"]["create_sample_rows"] = None
    raw["output"].update({"path": output_path, "mode": "overwrite"})
    raw["pruning"].update(pruning)
    return validate_config(raw, source=f"evaluation cell {cell.slug}")


RUN_COLUMNS = ("id", "answer", "error", "visual_tokens_in", "visual_tokens_kept", "cost_usd", "flops_total")


def read_run(path: str) -> list[dict[str, Any]]:
    """The columns scoring needs from one run's output (labels when present)."""
    ds = parquet_dataset(path)
    names = set(ds.schema.names)
    columns = [c for c in (*RUN_COLUMNS, "expected", "question_type") if c in names]
    return sorted(ds.to_table(columns=columns).to_pylist(), key=lambda r: r["id"])


@dataclass
class EvalRow:
    method: str  # label: registry method, plus alpha when set per cell
    keep: int  # configured budget (keep-all: visual tokens in)
    run: str
    rows: int
    error_rows: int
    accuracy: float | None  # None without labels
    relative: float | None  # accuracy / keep-all accuracy
    agreement: float  # answers equal (normalised) to keep-all's, same id
    mean_tokens_kept: float
    flops_per_image: float | None
    usd_per_1k_images: float | None
    cost_saving_vs_keep_all: float | None = None
    flops_saving_vs_keep_all: float | None = None
    per_type: dict[str, float] = field(default_factory=dict)


def score(cell: Cell, run: str, rows: list[dict[str, Any]], reference: list[dict[str, Any]]) -> EvalRow:
    ref_answer = {r["id"]: normalise(r["answer"]) for r in reference if not r["error"]}
    ok = [r for r in rows if not r["error"]]
    labelled = bool(rows) and all(r.get("expected") is not None for r in rows)

    per_type: dict[str, list[bool]] = {}
    if labelled and all(r.get("question_type") for r in rows):
        for r in rows:
            per_type.setdefault(r["question_type"], []).append(is_correct(r))

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    priced = [r["cost_usd"] for r in ok if r.get("cost_usd") is not None]
    flops = [r["flops_total"] for r in ok if r.get("flops_total") is not None]
    return EvalRow(
        method=cell.label,
        keep=cell.keep if cell.keep is not None else round(mean([r["visual_tokens_in"] for r in ok]) or 0),
        run=run,
        rows=len(rows),
        error_rows=len(rows) - len(ok),
        accuracy=mean([float(is_correct(r)) for r in rows]) if labelled else None,
        relative=None,
        agreement=mean([float(not r["error"] and ref_answer.get(r["id"]) == normalise(r["answer"])) for r in rows]) or 0.0,
        mean_tokens_kept=mean([r["visual_tokens_kept"] for r in ok]) or 0.0,
        flops_per_image=mean(flops),
        usd_per_1k_images=1000 * mean(priced) if priced else None,
        per_type={t: sum(v) / len(v) for t, v in sorted(per_type.items())},
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


def run_grid(base: JobConfig, cells: list[Cell], input_path: str, out: Path) -> list[EvalRow]:
    """Run every cell through the job, then score each against the keep-all run."""
    from pipeline.job import run_job

    runs: dict[Cell, str] = {}
    for cell in cells:
        path = str(out / "runs" / cell.slug)
        summary = run_job(cell_config(base, cell, input_path, path))
        if summary.output_rows != summary.input_rows:
            raise RuntimeError(f"cell {cell.slug}: {summary.input_rows} rows in, {summary.output_rows} out")
        runs[cell] = path
    reference = read_run(runs[cells[0]])
    results = [score(cell, path, read_run(path), reference) for cell, path in runs.items()]
    add_relative(results)
    return results


CSV_COLUMNS = [f.name for f in fields(EvalRow) if f.name != "per_type"]


def question_types(results: list[EvalRow]) -> list[str]:
    return sorted({t for r in results for t in r.per_type})


def write_csv(results: list[EvalRow], path: Path) -> None:
    types = question_types(results)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS + [f"accuracy_{t}" for t in types])
        w.writeheader()
        for r in results:
            row = {k: v for k, v in asdict(r).items() if k != "per_type"}
            row.update({f"accuracy_{t}": r.per_type.get(t) for t in types})
            w.writerow(row)


def table(results: list[EvalRow]) -> str:
    types = question_types(results)
    head = ["method", "keep", "tokens kept", "accuracy", "rel. perf.", *types, "agreement", "errors",
            "$/1k img", "cost saving", "FLOPs saving"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [
            r.method, str(r.keep), f"{r.mean_tokens_kept:.1f}", _pct(r.accuracy), _pct(r.relative),
            *[_pct(r.per_type.get(t)) for t in types], _pct(r.agreement), str(r.error_rows),
            "-" if r.usd_per_1k_images is None else f"{r.usd_per_1k_images:.4g}",
            _pct(r.cost_saving_vs_keep_all), _pct(r.flops_saving_vs_keep_all),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: list[EvalRow], *, corpus: str, command: str) -> str:
    labelled = any(r.accuracy is not None for r in results)
    n = results[0].rows if results else 0
    what = ("accuracy = normalised exact match against `expected`; rel. perf. = accuracy / keep-all accuracy; "
            "per-type columns: accuracy per `question_type`") if labelled else \
        "no `expected` column: agreement with the keep-all answers only"
    return "\n".join([
        "# Pruning quality and cost", "",
        f"Corpus: `{corpus}` ({n} rows). Command: `{command}`.", "",
        f"{what}; agreement = same normalised answer as keep-all; savings from the runs' own cost columns "
        "($: measured stage time x reserved resources at the price table; FLOPs: analytic).", "",
        table(results), "", "![accuracy against cost](eval.png)", "",
    ])


def chart(results: list[EvalRow], path: Path) -> None:
    """Accuracy (or agreement) against visual tokens kept and against $ per 1,000 images, one
    line per method; keep-all is a star with a grey reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labelled = any(r.accuracy is not None for r in results)
    metric = "accuracy" if labelled else "agreement with keep-all"

    def y(r: EvalRow) -> float:
        return 100 * (r.accuracy if labelled else r.agreement)

    priced = all(r.usd_per_1k_images is not None for r in results)
    panels = [("visual tokens kept per image", lambda r: r.mean_tokens_kept)]
    if priced:
        panels.append(("$ per 1,000 images (measured)", lambda r: r.usd_per_1k_images))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    lines: dict[str, list[EvalRow]] = {}
    for r in results:
        lines.setdefault(r.method, []).append(r)
    for ax, (xlabel, x) in zip(axes[0], panels, strict=True):
        for method, members in lines.items():
            members = sorted(members, key=x)
            if method == KEEP_ALL:
                ax.axhline(y(members[0]), color="grey", linewidth=1)
                ax.plot([x(m) for m in members], [y(m) for m in members], "*", markersize=13, color="black",
                        label="keep all")
                continue
            style = "--" if "alpha=" in method else "-"
            ax.plot([x(m) for m in members], [y(m) for m in members], marker="o", linestyle=style, label=method)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Pruning: {metric} against budget and cost ({results[0].rows} rows)" if results else "")
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
