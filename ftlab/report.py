"""Compare the jobs of a sweep: one table, and plots of loss curves and the Pareto front.

    python -m ftlab.report multirun/2026-11-24/10-00-00

For a directory of dry runs (``dry_run=true``, each with a ``plan.json``) it prints one table
of the plans instead: trainable parameters, and memory per device without and with gradient
checkpointing (GiB = 2^30 bytes).

Otherwise it reads every ``metrics.json`` below the directory (one per job; no W&B needed) and writes, into
that directory:

- ``report.csv`` and ``report.md`` (the Markdown table is also printed): one row per job with
  method, r, alpha, precision/quantization, trainable parameters, final validation loss and
  task metric, tokens/s, peak memory, wall time and status;
- ``val_loss_curves.png``: validation loss against optimizer step for every completed job;
- ``pareto.png``: task metric (exact match for instruction and chat data, accuracy for
  classification; validation loss where the jobs share neither) against trainable parameters on
  a log scale, with the Pareto front marked: the jobs no other job beats on both quality and size.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ftlab.console import CommandParser, quiet_third_party
from ftlab.errors import UserError

COLUMNS = ["job", "method", "r", "alpha", "lr", "precision", "quantization", "trainable_params",
           "val_loss", "val_exact_match", "val_answer_f1", "val_accuracy", "val_f1",
           "tokens_per_second", "peak_memory_mb", "wall_time_s", "status", "error"]
# Shown in the printed table only when some job has them: the task metrics of generation data
# (exact match, answer F1) and of classification data (accuracy, macro F1), and failures.
OPTIONAL = ("val_exact_match", "val_answer_f1", "val_accuracy", "val_f1", "error")
# The task metric the Pareto plot puts against trainable parameters, in order of preference:
# the first one every completed job has (all higher-is-better); else validation loss.
TASK_METRICS = (("val_exact_match", "exact match"), ("val_accuracy", "accuracy"))
PERCENT = ("val_exact_match", "val_answer_f1", "val_accuracy", "val_f1")


@dataclass
class Job:
    path: Path           # the job's directory, relative to the sweep directory
    metrics: dict[str, Any]
    root: Path = Path(".")  # the sweep directory

    def row(self) -> dict[str, Any]:
        m = self.metrics
        row = {c: m.get(c) for c in COLUMNS}
        row["job"] = str(self.path)
        row["lr"] = self.lr
        if m.get("status") == "failed" and not m.get("method"):
            row["method"] = _override(m, "method")
        return row

    @cached_property  # read once: plot labels ask every job for it
    def lr(self) -> float | None:
        """The base learning rate: in metrics.json, or (runs before it was recorded there) in
        the job's resolved config.yaml."""
        if self.metrics.get("lr") is not None:
            return self.metrics["lr"]
        return _config_value(self.root / self.path / "config.yaml", ("optimizer", "lr"))


def _config_value(path: Path, keys: tuple[str, ...]) -> Any:
    import yaml

    try:
        node = yaml.safe_load(path.read_text())
        for k in keys:
            node = node[k]
        return node
    except (OSError, KeyError, TypeError, yaml.YAMLError):  # no value: an empty cell, not an error
        return None


def _override(metrics: dict[str, Any], key: str) -> str | None:
    for o in metrics.get("overrides", []):
        k, _, v = o.partition("=")
        if k.lstrip("+~") == key:
            return v
    return None


def collect(directory: Path) -> list[Job]:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory")
    jobs = []
    for path in sorted(directory.rglob("metrics.json"), key=lambda p: _natural(p.parent)):
        try:
            metrics = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON ({err.msg}); was the job killed while writing?") from None
        jobs.append(Job(path.parent.relative_to(directory), metrics, directory))
    if not jobs:
        raise UserError(f"no job results (metrics.json) under {directory}; "
                        "point ftlab.report at a run or sweep directory")
    return jobs


def _natural(path: Path) -> list:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _fmt(value: Any, column: str) -> str:
    if value is None:
        return ""
    if column in PERCENT:
        return f"{100 * value:.1f}%"
    if column == "trainable_params":
        return f"{value:,}"
    if column == "lr":
        return f"{float(value):g}"
    if isinstance(value, float):
        if column == "val_loss":
            return f"{value:.4f}"
        return f"{value:.0f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [_fmt(row.get(c), c).replace("|", "/").replace("\n", " ")[:80] for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points that no other point beats: fewer-or-equal parameters AND
    better-or-equal quality, strictly better in at least one."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = False
        for j, (x2, y2) in enumerate(points):
            if j == i:
                continue
            better_or_equal = (y2 >= y) if higher_is_better else (y2 <= y)
            strictly = (y2 > y) if higher_is_better else (y2 < y)
            if x2 <= x and better_or_equal and (x2 < x or strictly):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front


def _label(job: Job, jobs: list[Job]) -> str:
    """The job's run name (method, rank, alpha, precision) without what all the jobs plotted
    together share (their precision), with the learning rate where they do not share one."""
    name = job.metrics.get("run_name") or str(job.path)
    precisions = {j.metrics.get("precision") for j in jobs}
    if len(precisions) == 1 and job.metrics.get("precision") and name.endswith(f"-{job.metrics['precision']}"):
        name = name[: -len(job.metrics["precision"]) - 1]
    if len({j.lr for j in jobs}) > 1 and job.lr is not None:
        name += f" lr={float(job.lr):g}"
    return name


def plot_curves(jobs: list[Job], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    shown = [j for j in jobs if j.metrics.get("status") == "completed" and j.metrics.get("val_history")]
    # 20 distinct colours, then the same colours dashed: a 17-method sweep has no repeated line.
    colours, styles = plt.cm.tab20.colors, ("-", "--", ":")
    for i, job in enumerate(shown):
        history = job.metrics["val_history"]
        ax.plot([h["step"] for h in history], [h["val_loss"] for h in history], marker="o",
                markersize=3, color=colours[i % len(colours)], linestyle=styles[i // len(colours) % 3],
                label=_label(job, shown))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _label_lifts(points: list[tuple[float, float]]) -> list[int]:
    """How many lines to lower each point's label so that no two labels overlap: a label starts
    at its point and runs about 0.8 decades of parameters to the right, one line is about 3% of
    the score range; each label takes the first line, going down, that no earlier label holds."""
    import math

    ys = [y for _, y in points]
    line = 0.033 * ((max(ys) - min(ys)) if ys else 0.0) or 1e-9
    placed: list[tuple[float, float]] = []  # (log10 x, label y) of the labels placed so far
    lifts = []
    for x, y in points:
        lx, lift = math.log10(max(x, 1)), 0
        while any(-0.8 < lx - px < 0.8 and abs((y - lift * line) - py) < 0.9 * line for px, py in placed):
            lift += 1
        placed.append((lx, y - lift * line))
        lifts.append(lift)
    return lifts


def plot_pareto(jobs: list[Job], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [j for j in jobs if j.metrics.get("status") == "completed" and j.metrics.get("trainable_params")]
    key, label = next(((k, name) for k, name in TASK_METRICS
                       if done and all(j.metrics.get(k) is not None for j in done)),
                      ("val_loss", "validation loss"))
    points = [(float(j.metrics["trainable_params"]), float(j.metrics[key])) for j in done]
    front = set(pareto_front(points, higher_is_better=key != "val_loss"))
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, ((job, (x, y)), lift) in enumerate(zip(zip(done, points), _label_lifts(points))):
        ax.scatter([x], [y], s=40, color="tab:red" if i in front else "tab:blue", zorder=3)
        ax.annotate(_label(job, done), (x, y), fontsize=7,
                    xytext=(4, 3 - 9 * lift), textcoords="offset points")
    if front:
        line = sorted(points[i] for i in front)
        ax.plot([p[0] for p in line], [p[1] for p in line], color="tab:red", linestyle="--",
                label="Pareto front", zorder=2)
        ax.legend()
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(label)
    ax.set_title(f"{label} vs trainable parameters")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return key


GIB = 2**30


def plans_table(root: Path) -> str:
    """A markdown table of every ``plan.json`` under ``root`` (dry runs), memory in GiB."""
    rows = []
    for path in Path(root).rglob("plan.json"):
        p = json.loads(path.read_text())
        plain, ckpt = p["memory"]["without_checkpointing"], p["memory"]["with_checkpointing"]
        rows.append((p["method"], p["precision"], p["quantization"], p["trainable_params"],
                     100 * p["trainable_params"] / p["total_params"], plain["weights"] / GIB,
                     (plain["gradients"] + plain["optimizer_states"]) / GIB,
                     plain["activations"] / GIB, plain["peak"] / GIB, ckpt["activations"] / GIB,
                     ckpt["peak"] / GIB))
    lines = ["| method | precision | base | trainable params | % of total | weights | grads + optimizer "
             "| activations | **peak** | activations, grad. ckpt | **peak, grad. ckpt** |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, prec, q, t, share, *gib in sorted(rows):
        lines.append(f"| {m} | {prec} | {q} | {t:,} | {share:.3f} | "
                     + " | ".join(f"{x:.1f}" for x in gib) + " |")
    return "\n".join(lines)


def report(directory: Path, columns: list[str] | None = None) -> str:
    directory = Path(directory)
    if directory.is_dir() and not any(directory.rglob("metrics.json")) and any(directory.rglob("plan.json")):
        table = plans_table(directory)
        (directory / "plans.md").write_text(table + "\n")
        return table
    jobs = collect(directory)
    rows = [j.row() for j in jobs]
    columns = columns or [c for c in COLUMNS
                          if c not in OPTIONAL or any(r.get(c) is not None and r.get(c) != "" for r in rows)]
    if unknown := [c for c in columns if c not in COLUMNS]:
        raise UserError(f"unknown column(s) {', '.join(unknown)}; columns: {', '.join(COLUMNS)}")
    with open(directory / "report.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in COLUMNS})
    table = markdown_table(rows, columns)
    (directory / "report.md").write_text(table + "\n")
    plot_curves(jobs, directory / "val_loss_curves.png")
    plot_pareto(jobs, directory / "pareto.png")
    return table


def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    parser = CommandParser(prog="python -m ftlab.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="a sweep (multirun) or run directory")
    parser.add_argument("--columns", help=f"comma-separated columns of the printed table (default: all "
                                          f"that apply); any of {', '.join(COLUMNS)}")
    args = parser.parse_args(argv)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    try:
        table = report(args.directory, columns)
    except UserError as err:
        print(f"ftlab.report: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(table)
    if (args.directory / "report.csv").is_file():
        print(f"\nwrote {args.directory / 'report.csv'}, report.md, val_loss_curves.png, pareto.png")


if __name__ == "__main__":
    main()
