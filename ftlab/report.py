"""Compare the jobs of a sweep: tables over seeds, a test against a baseline, and plots.

    python -m ftlab.report multirun/methods/2026-11-24_10-00-00 [--baseline lora]

For a directory of dry runs (``dry_run=true``, each with a ``plan.json``) it prints one table
of the plans instead: trainable parameters, and memory per device without and with gradient
checkpointing (GiB = 2^30 bytes).

Otherwise it reads every ``metrics.json`` below the directory (one per job; no W&B needed),
groups the jobs that differ only in ``seed`` into configurations (:mod:`ftlab.compare`) and
writes, into that directory:

- ``jobs.csv``: one row per job (method, r, alpha, lr, seed, precision/quantization, trainable
  parameters, validation loss, task metric, tokens/s, peak memory, wall time, status, error);
- ``jobs.csv`` and the tables also carry the standard benchmarks a job was scored on with
  ``ftlab.eval --lm-eval`` (its ``lm_eval.json``): one column per task and metric, such as
  ``arc_easy/acc``, summarised over seeds like the others and tested against the baseline in
  report.csv;
- ``report.csv``: one row per configuration: how many seeds completed of how many expected, and
  for every numeric metric its mean, standard deviation, n and 95% confidence interval (Student
  t, n-1 dof), the learning-rate selection, and the paired t-test against the baseline;
- ``report.md``, also printed: with one seed per configuration, the job table; with several, the
  configuration table (mean +- std [95% CI]) and a column comparing each with the baseline, where
  ``n.s.`` marks a difference not significant at 5% (docs/statistics.md);
- ``val_loss_curves.png``: validation loss against optimizer step (mean over seeds, CI bars);
- ``pareto.png``: the task metric (exact match for instruction and chat data, accuracy for
  classification; validation loss where the jobs share neither) against trainable parameters,
  peak memory and wall time, with the Pareto front marked in each panel.

Configurations that differ only in the learning rate (``optimizer.lr`` or ``lr_scale``) are one
family: the table and plots show the rate with the lowest mean validation loss, report.csv all.

``--wandb`` also logs the tables and plots to W&B, as a run of the group the jobs logged to.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from ftlab.compare import (Config, baseline_config, collect, compare, group, lm_eval_metrics, scored_split,
                           task_metric, test_examples)
from ftlab.console import CommandParser, quiet_third_party
from ftlab.errors import UserError
from ftlab.metrics.lm_harness import is_fraction
from ftlab.plots import label_lifts as _label_lifts, pareto_front, plot_curves, plot_pareto
from ftlab.stats import ALPHA, Summary
from ftlab.training.dashboard import log_report, wandb_target

__all__ = ["collect", "pareto_front", "plot_curves", "plot_pareto", "report", "_label_lifts"]

COLUMNS = ["job", "method", "r", "alpha", "lr", "seed", "precision", "quantization", "trainable_params",
           "val_loss", "val_exact_match", "val_answer_f1", "val_accuracy", "val_f1",
           "test_loss", "test_exact_match", "test_answer_f1", "test_accuracy", "test_f1",
           "tokens_per_second", "peak_memory_mb", "wall_time_s", "outside_training_share", "status", "error"]
# Shown in the printed table only when some job has them: the task metrics of generation data
# (exact match, answer F1) and of classification data (accuracy, macro F1), the share of a job's
# wall time spent outside training (start-up, loading, evaluation, saving), and failures.
# With a held-out test split, its scores too (test_*).
SCORES = ["val_loss", "val_exact_match", "val_answer_f1", "val_accuracy", "val_f1"]
TEST_SCORES = [s.replace("val_", "test_", 1) for s in SCORES]
OPTIONAL = ("val_exact_match", "val_answer_f1", "val_accuracy", "val_f1", *TEST_SCORES,
            "outside_training_share", "error")
COSTS = ["tokens_per_second", "peak_memory_mb", "wall_time_s", "outside_training_share"]
# The metrics of the configuration table, in this order, where some job has them: the scores of
# the split the comparison is on (the test split when every job has one), then the costs.
SHOWN_METRICS = TEST_SCORES + SCORES + COSTS
# The method every configuration is tested against when --baseline is not given (if present).
DEFAULT_BASELINE = "lora"
DESCRIBE = ["method", "r", "alpha", "lr", "precision", "quantization", "trainable_params"]
PERCENT = ("val_exact_match", "val_answer_f1", "val_accuracy", "val_f1", *TEST_SCORES[1:],
           "outside_training_share")


def _fmt(value: Any, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):  # already formatted (a configuration table's cell)
        return value
    if column in PERCENT or is_fraction(column):
        return f"{100 * value:.1f}%"
    if column == "trainable_params":
        return f"{value:,}"
    if column == "lr":
        return f"{float(value):g}"
    if isinstance(value, float):
        if column.endswith("_loss"):
            return f"{value:.4f}"
        return f"{value:.0f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [_fmt(row.get(c), c).replace("|", "/").replace("\n", " ")[:80] for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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




def job_row(job) -> dict[str, Any]:
    m = job.metrics
    row = {c: m.get(c) for c in COLUMNS + job.lm_eval}
    row.update(job=str(job.path), lr=job.lr, seed=job.seed)
    if m.get("status") == "failed" and not m.get("method"):
        row["method"] = next((o.split("=", 1)[1] for o in m.get("overrides", [])
                              if o.split("=", 1)[0].lstrip("+~") == "method"), None)
    return row


def _interval(s: Summary | None, column: str) -> str:
    """``mean +- std [low, high]`` (the 95% t-interval); the mean alone for one seed."""
    if s is None:
        return ""
    if s.std is None:
        return _fmt(s.mean, column)
    return f"{_fmt(s.mean, column)} ± {_fmt(s.std, column)} [{_fmt(s.low, column)}, {_fmt(s.high, column)}]"


def _versus(comparisons, metric: str) -> dict[int, str]:
    """``id(config) -> 'diff (p=..)'`` for the printed column, ``n.s.`` where p >= 5%."""
    out = {}
    for c in comparisons:
        if c.metric != metric:
            continue
        t = c.test
        diff = (f"{100 * t.mean_difference:+.1f} pt" if metric in PERCENT or is_fraction(metric)
                else f"{t.mean_difference:+.4f}")
        if t.p is None:
            out[id(c.config)] = f"{diff} (no test: {t.pairs} pair)"
        else:
            out[id(c.config)] = f"{diff} (p={t.p:.3f}{', n.s.' if not t.significant(ALPHA) else ''})"
    return out


def _after_task_metrics(columns: list[str], extra: list[str]) -> list[str]:
    """``columns`` with ``extra`` (the lm-eval metrics) after the last validation task metric."""
    at = max((i + 1 for i, c in enumerate(columns) if c in ("val_loss",) + OPTIONAL[:4]), default=len(columns))
    return columns[:at] + extra + columns[at:]


def _numeric_metrics(configs: list[Config]) -> list[str]:
    found = {k for c in configs for j in c.done for k in j.measured()}
    return [m for m in SHOWN_METRICS if m in found] + sorted(found - set(SHOWN_METRICS))


def summary_rows(configs: list[Config], comparisons, baseline: Config | None) -> list[dict[str, Any]]:
    """report.csv: one row per configuration (module docstring)."""
    rows = []
    metrics = _numeric_metrics(configs)
    for c in configs:
        row: dict[str, Any] = {"config": c.label, **{k: c.first(k) for k in DESCRIBE},
                               "seeds": c.seeds_cell(), "n": len(c.done),
                               "expected": max(len(c.expected_seeds), len(c.jobs)), "failed": c.failed,
                               "missing_seeds": " ".join(map(str, c.missing)),
                               "selected": "" if c.selected is None else c.selected}
        for m in metrics:
            s = c.summary(m)
            row.update({f"{m}_mean": s and s.mean, f"{m}_std": s and s.std, f"{m}_n": s.n if s else 0,
                        f"{m}_ci95_low": s and s.low, f"{m}_ci95_high": s and s.high})
        row["baseline"] = baseline.label if baseline else ""
        for comp in comparisons:
            if comp.config is c:
                t = comp.test
                row.update({f"vs_baseline_{comp.metric}_diff": t.mean_difference,
                            f"vs_baseline_{comp.metric}_pairs": t.pairs,
                            f"vs_baseline_{comp.metric}_t": t.t, f"vs_baseline_{comp.metric}_p": t.p,
                            f"vs_baseline_{comp.metric}_significant": t.significant(ALPHA)})
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in fields})


def report(directory: Path, columns: list[str] | None = None, baseline: str | None = None) -> str:
    directory = Path(directory)
    if directory.is_dir() and not any(directory.rglob("metrics.json")) and any(directory.rglob("plan.json")):
        table = plans_table(directory)
        (directory / "plans.md").write_text(table + "\n")
        return table
    jobs = collect(directory)
    configs = group(jobs, directory)
    key, name = task_metric(configs)
    split = scored_split(configs)  # test: the headline scores are the held-out test split's
    tested = [f"{split}_loss"] + ([key] if key != f"{split}_loss" else [])
    methods = [c.first("method") for c in configs]
    base_name = baseline or (DEFAULT_BASELINE if DEFAULT_BASELINE in methods else None)
    base = baseline_config(configs, base_name) if base_name else None
    if baseline and base is None:
        raise UserError(f"--baseline {baseline}: no completed job of method {baseline!r}; "
                        f"methods here: {', '.join(sorted({str(m) for m in methods}))}")
    benchmarks = lm_eval_metrics(jobs)
    comparisons = compare(configs, base, tested + benchmarks) if base else []

    rows = [job_row(j) for j in jobs]
    _write_csv(directory / "jobs.csv", rows, _after_task_metrics(COLUMNS, benchmarks))
    summary = summary_rows(configs, comparisons, base)
    fields = list(dict.fromkeys(k for r in summary for k in r))
    _write_csv(directory / "report.csv", summary, fields)

    several = any(len(c.jobs) > 1 for c in configs) or any(c.missing for c in configs)
    notes = []
    if not several:
        allowed = _after_task_metrics(COLUMNS, benchmarks)
        columns = columns or [c for c in allowed if c not in OPTIONAL + ("seed",)
                              or any(r.get(c) is not None and r.get(c) != "" for r in rows)]
        table_rows = rows
        if any(c.selected is not None for c in configs):
            notes.append("learning rate selected per method by validation loss: see report.csv (one seed each)")
        notes.append("one seed per configuration: no confidence intervals or significance tests "
                     "(run the sweep with seeds=N)")
    else:
        shown = [c for c in configs if c.selected is not False]
        headline = (TEST_SCORES if split == "test" else SCORES) + COSTS
        metrics = [m for m in _after_task_metrics(headline, benchmarks) if any(c.summary(m) for c in configs)]
        # One column per tested metric: "vs lora (val_loss)", "vs lora (val_exact_match)".
        versus = {m: f"vs {base_name} ({m})" for m in tested} if base else {}
        allowed = ["config", *DESCRIBE, "seeds", *metrics, *versus.values()]
        columns = columns or [c for c in allowed if c not in DESCRIBE or c in ("method", "lr", "trainable_params")
                              or len({str(cfg.first(c)) for cfg in shown}) > 1]  # what sets them apart
        vs = {m: _versus(comparisons, m) for m in versus}
        table_rows = []
        for c in shown:
            row = {"config": c.label, **{k: c.first(k) for k in DESCRIBE}, "seeds": c.seeds_cell()}
            row.update({m: _interval(c.summary(m), m) for m in metrics})
            for m, column in versus.items():
                row[column] = "baseline" if c is base else vs[m].get(id(c), "")
            table_rows.append(row)
        notes.append("cells: mean ± std [95% confidence interval of the mean, Student t with n-1 dof] over "
                     "the completed seeds; seeds: completed/expected (failed and missing ones are left out)")
        if base:
            notes.append(f"vs {base_name}: mean paired difference from {base.label} (same seeds), "
                         f"paired t-test, two-sided; n.s. = not significant at {ALPHA:.0%}")
        if any(c.selected is not None for c in configs):
            notes.append("learning rate selected per method by mean validation loss; every rate is in report.csv")
    if split == "test":
        notes.insert(0, f"scores on the held-out test split (n={test_examples(configs)} examples), of "
                        "the model each run kept (its best validation loss); learning rates and "
                        "checkpoints were selected on the validation split, never on the test split")
    if unknown := [c for c in columns if c not in allowed]:
        raise UserError(f"unknown column(s) {', '.join(unknown)}; columns: {', '.join(allowed)}")
    table = markdown_table(table_rows, columns) + "\n\n" + "\n".join(f"- {n}" for n in notes)
    (directory / "report.md").write_text(table + "\n")
    plot_curves(configs, directory / "val_loss_curves.png")
    plot_pareto(configs, directory / "pareto.png")
    return table


def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    parser = CommandParser(prog="python -m ftlab.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="a sweep (multirun) or run directory")
    parser.add_argument("--columns", help=f"comma-separated columns of the printed table (default: all "
                                          f"that apply); any of {', '.join(COLUMNS)}, and TASK/METRIC "
                                          "for the lm-eval benchmarks a job was scored on")
    parser.add_argument("--baseline", help="the method every other configuration is tested against "
                                            "(paired t-test over seeds; default: lora when present)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the tables and plots to W&B, as a run (job_type=report) of the group "
                             "the jobs logged to (they ran with logger=wandb)")
    args = parser.parse_args(argv)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    try:
        target = args.wandb and wandb_target([j.metrics for j in collect(args.directory)])
        if args.wandb and not target:
            raise UserError(f"--wandb: no job under {args.directory} logged to W&B; run them with logger=wandb "
                            "(or with wandb among others, logger=[csv,wandb])")
        table = report(args.directory, columns, args.baseline)
    except UserError as err:
        print(f"ftlab.report: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(table)
    if (args.directory / "report.csv").is_file():
        print(f"\nwrote {args.directory / 'report.csv'}, jobs.csv, report.md, val_loss_curves.png, pareto.png")
    if target:
        where = log_report(args.directory, target)
        print(f"logged the report to W&B group {target['group']!r} of project {target['project']!r}: {where}"
              + (f" (offline; sync with: wandb sync {where})" if target["mode"] == "offline" else ""))


if __name__ == "__main__":
    main()
