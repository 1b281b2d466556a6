"""The comparison plots of ``python -m ftlab.report``: validation-loss curves and Pareto views.

Each point or curve is one configuration (:class:`ftlab.compare.Config`): the mean over its
completed seeds, with error bars of the 95% Student-t interval of that mean where it has two or
more seeds (docs/statistics.md). The Pareto views put the task metric against three costs, one
panel each: trainable parameters, peak memory and wall time; the front marks the configurations
that no other one beats on both quality and that cost.
"""

from __future__ import annotations

import math
from pathlib import Path

from ftlab.compare import Config, Job, group, task_metric
from ftlab.stats import Summary, summarize

COSTS = (("trainable_params", "trainable parameters"), ("peak_memory_mb", "peak memory (MB)"),
         ("wall_time_s", "wall time (s)"))


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points that no other point beats: fewer-or-equal cost AND
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


def label_lifts(points: list[tuple[float, float]]) -> list[int]:
    """How many lines to lower each point's label so that no two labels overlap: a label starts
    at its point and runs about 0.8 decades of parameters to the right, one line is about 3% of
    the score range; each label takes the first line, going down, that no earlier label holds."""
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _configs(items: list) -> list[Config]:
    return group(items) if items and isinstance(items[0], Job) else items


def _shown(configs: list[Config]) -> list[Config]:
    """The configurations to plot: those with a completed job, the selected learning rate only."""
    return [c for c in configs if c.done and c.selected is not False]


def plot_curves(items: list, out: Path) -> None:
    """Validation loss against optimizer step: the mean over seeds, error bars of its 95% CI."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    shown = [c for c in _shown(_configs(items)) if any(j.metrics.get("val_history") for j in c.done)]
    # 20 distinct colours, then the same colours dashed: a 17-method sweep has no repeated line.
    colours, styles = plt.cm.tab20.colors, ("-", "--", ":")
    for i, config in enumerate(shown):
        by_step: dict[int, list[float]] = {}
        for job in config.done:
            for h in job.metrics.get("val_history") or []:
                by_step.setdefault(h["step"], []).append(h["val_loss"])
        steps = sorted(by_step)
        stats = [summarize(by_step[s]) for s in steps]
        ax.errorbar(steps, [s.mean for s in stats], yerr=[s.half_width or 0.0 for s in stats],
                    marker="o", markersize=3, capsize=2, color=colours[i % len(colours)],
                    linestyle=styles[i // len(colours) % 3], label=_legend(config))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss (mean over seeds, 95% CI)" if any(len(c.done) > 1 for c in shown)
                 else "Validation loss")
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _legend(config: Config) -> str:
    n = len(config.done)
    return config.label + (f" (n={n})" if n > 1 else "")


def _cost(config: Config, cost: str) -> Summary | None:
    """A configuration's cost over its seeds; its trainable parameters are one number."""
    if cost == "trainable_params":
        value = config.first(cost)
        return Summary(float(value), None, 1, None) if value else None
    return config.summary(cost)


def plot_pareto(items: list, out: Path) -> str:
    """The task metric against trainable parameters (log scale), peak memory and wall time
    (three panels), Pareto front marked in each; returns the task metric's key."""
    plt = _pyplot()
    configs = _configs(items)
    key, name = task_metric(configs)
    shown = [c for c in _shown(configs) if c.summary(key) is not None]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    for ax, (cost, cost_name) in zip(axes, COSTS):
        placed = [(c, x, c.summary(key)) for c in shown if (x := _cost(c, cost)) is not None]
        points = [(x.mean, y.mean) for _, x, y in placed]
        front = set(pareto_front(points, higher_is_better=not key.endswith("_loss")))
        for i, ((config, x, y), lift) in enumerate(zip(placed, label_lifts(points))):
            ax.errorbar([x.mean], [y.mean], xerr=[[x.half_width or 0.0]] if cost != "trainable_params" else None,
                        yerr=[[y.half_width or 0.0]], fmt="o", markersize=6, capsize=3, zorder=3,
                        color="tab:red" if i in front else "tab:blue")
            ax.annotate(config.label, (x.mean, y.mean), fontsize=7, xytext=(4, 3 - 9 * lift),
                        textcoords="offset points")
        if front:
            line = sorted(points[i] for i in front)
            ax.plot([p[0] for p in line], [p[1] for p in line], color="tab:red", linestyle="--",
                    label="Pareto front", zorder=2)
            ax.legend()
        if cost == "trainable_params":  # spans orders of magnitude across methods
            ax.set_xscale("log")
        ax.set_xlabel(f"{cost_name} (log scale)" if cost == "trainable_params" else cost_name)
        ax.set_ylabel(name)
        ax.set_title(f"{name} vs {cost_name}")
        ax.grid(alpha=0.3, which="both")
    if any(len(c.done) > 1 for c in shown):
        fig.suptitle("mean over seeds; error bars: 95% confidence interval (Student t)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return key
