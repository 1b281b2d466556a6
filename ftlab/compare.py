"""The jobs of a sweep, grouped for comparison: read every ``metrics.json``, group the jobs that
differ only in ``seed`` into one configuration, summarise each numeric metric over the seeds,
pick a learning rate per method, and test each configuration against a baseline.

- A job's identity is its Hydra overrides (``.hydra/overrides.yaml``, or ``overrides`` in a failed
  job's metrics.json); without them (runs from several commands), its method, model, data, rank,
  alpha, learning rate, precision and quantization.
- A configuration's expected seeds are every seed the sweep ran (or, from the sweep's
  ``multirun.yaml``, every seed and every grid cell it asked for): a seed with no completed job is
  missing or failed, and left out of the aggregates.
- Learning-rate selection: configurations that differ only in the learning rate
  (``optimizer.lr``, ``lr_scale``) form one family; the one with the lowest mean validation loss
  is selected and the others are marked as not selected.
- Baseline: each configuration against the baseline's, by a paired t-test over the seeds both
  completed (:func:`ftlab.stats.paired_t_test`).
- Standard benchmarks: a job's ``lm_eval.json`` (``ftlab.eval --lm-eval``) adds one metric per
  task and lm-eval metric (``arc_easy/acc``), grouped and summarised like the others.
- Scores: on the held-out test split (``test_*`` in metrics.json) when every completed job has
  one, else on the validation split. Selection (learning rate, the baseline among several of its
  configurations) always uses validation loss: the test split selects nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ftlab.errors import UserError
from ftlab.metrics.lm_harness import read_columns
from ftlab.stats import PairedTest, Summary, paired_t_test, summarize

LR_KEYS = ("optimizer.lr", "lr_scale")
# What identifies a job whose overrides are unknown.
DESCRIPTIVE = ("method", "model", "data", "r", "alpha", "lr", "precision", "quantization")
# Numbers in metrics.json that describe a configuration rather than measure a run.
NOT_MEASURED = {"seed", "r", "alpha", "lr", "trainable_params", "total_params", "world_size",
                "train_examples", "val_examples", "test_examples", "test_step", "resumed_at_step"}


@dataclass
class Job:
    path: Path           # the job's directory, relative to the sweep directory
    metrics: dict[str, Any]
    root: Path = Path(".")  # the sweep directory
    lm_eval: list[str] = field(default_factory=list)  # its metrics from lm_eval.json (in metrics too)

    @property
    def completed(self) -> bool:
        return self.metrics.get("status") == "completed"

    @cached_property  # read once: plot labels ask every job for it
    def lr(self) -> float | None:
        """The base learning rate: in metrics.json, or (runs before it was recorded there) in
        the job's resolved config.yaml."""
        if self.metrics.get("lr") is not None:
            return self.metrics["lr"]
        return _config_value(self.root / self.path / "config.yaml", ("optimizer", "lr"))

    @cached_property
    def overrides(self) -> list[str] | None:
        if self.metrics.get("overrides") is not None:
            return list(self.metrics["overrides"])
        value = _config_value(self.root / self.path / ".hydra" / "overrides.yaml", ())
        return list(value) if isinstance(value, list) else None

    @cached_property
    def seed(self) -> int | None:
        for value in (self.metrics.get("seed"), _override(self.overrides or [], "seed"),
                      _config_value(self.root / self.path / "config.yaml", ("seed",))):
            if value is not None:
                return int(value)
        return None

    @cached_property
    def key(self) -> tuple:
        """What the job ran, without its seed: the jobs of one configuration share it."""
        if self.overrides is not None:
            return ("overrides",) + tuple(sorted(without_seed(self.overrides)))
        return ("fields",) + tuple(f"{k}={self.metrics.get(k)}" for k in DESCRIPTIVE)

    def measured(self) -> dict[str, float]:
        """The numeric metrics of a completed job (none for any other)."""
        if not self.completed:
            return {}
        return {k: float(v) for k, v in self.metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_MEASURED}


def _name(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def without_seed(overrides: list[str]) -> list[str]:
    """The overrides as Hydra applies them (the last one of a key wins), without ``seed``."""
    last = {_name(o): o for o in overrides}
    return [o for o in overrides if last[_name(o)] is o and _name(o) != "seed"]


def _override(overrides: list[str], key: str) -> str | None:
    for o in overrides:
        if _name(o) == key:
            return o.split("=", 1)[1] if "=" in o else None
    return None


def _config_value(path: Path, keys: tuple[str, ...]) -> Any:
    import yaml

    try:
        node = yaml.safe_load(path.read_text())
        for k in keys:
            node = node[k]
        return node
    except (OSError, KeyError, TypeError, yaml.YAMLError):  # no value: an empty cell, not an error
        return None


def lm_eval_metrics(jobs: list[Job]) -> list[str]:
    """The lm-eval metrics some job has, in the order they first appear."""
    return list(dict.fromkeys(k for j in jobs for k in j.lm_eval))


def natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def collect(directory: Path) -> list[Job]:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory")
    jobs = []
    for path in sorted(directory.rglob("metrics.json"), key=lambda p: natural(p.parent)):
        try:
            metrics = json.loads(path.read_text())
        except (json.JSONDecodeError, RecursionError, UnicodeDecodeError) as err:
            reason = f"{err.msg}, line {err.lineno}" if isinstance(err, json.JSONDecodeError) else type(err).__name__
            raise UserError(f"{path} is not valid JSON ({reason}); was it truncated or edited by hand?") from None
        check_metrics(path, metrics)
        benchmarks = read_columns(path.parent)
        jobs.append(Job(path.parent.relative_to(directory), {**metrics, **benchmarks}, directory,
                        list(benchmarks)))
    if not jobs:
        raise UserError(f"no job results (metrics.json) under {directory}; "
                        "point ftlab.report at a run or sweep directory")
    return jobs


# What the report reads from a metrics.json, by type (a file edited by hand is checked first).
_TEXT = ("status", "method", "model", "data", "run_name", "precision", "quantization", "error", "validation")
_NUMBERS = ("seed", "lr", "trainable_params", "total_params", "steps", "tokens_per_second", "peak_memory_mb",
            "wall_time_s", "train_time_s", "step_time_s", "outside_training_share")


def check_metrics(path: Path, m: Any) -> None:
    """A :class:`UserError` naming the file and field where ``m`` is not what a run writes."""
    def bad(field: str, expected: str, value: Any) -> UserError:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        return UserError(f"{path}: field {field!r} must be {expected}, got {type(value).__name__} {shown}; "
                         "was it edited by hand?")

    if not isinstance(m, dict):
        raise UserError(f"{path}: expected a JSON object (a run's metrics), got {type(m).__name__}")
    for key, value in m.items():
        if value is None:
            continue
        if key in _TEXT and not isinstance(value, str):
            raise bad(key, "a string", value)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if (key in _NUMBERS or key.startswith("val_") and key != "val_history") and not is_number:
            raise bad(key, "a number", value)
        if key == "seed" and not float(value).is_integer():
            raise bad(key, "an integer", value)
    if not isinstance(m.get("val_history") or [], list):
        raise bad("val_history", "a list", m["val_history"])
    overrides = m.get("overrides")
    if overrides is not None and not (isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)):
        raise bad("overrides", "a list of strings", overrides)
    for i, point in enumerate(m.get("val_history") or []):
        if not isinstance(point, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in point.values()) or "step" not in point:
            raise bad(f"val_history[{i}]", "an object of numbers with a step", point)


@dataclass
class Config:
    """The jobs of one configuration (one per seed) and the seeds it should have."""

    key: tuple
    parts: list[str] = field(default_factory=list)  # its overrides, without the seed, in order
    jobs: list[Job] = field(default_factory=list)
    expected_seeds: list[int] = field(default_factory=list)
    label: str = ""
    selected: bool | None = None  # learning-rate selection: None when there was none to make
    family: tuple = ()

    @property
    def done(self) -> list[Job]:
        return [j for j in self.jobs if j.completed]

    @property
    def failed(self) -> int:
        return sum(1 for j in self.jobs if j.metrics.get("status") == "failed")

    @property
    def missing(self) -> list[int]:
        ran = {j.seed for j in self.jobs}
        return [s for s in self.expected_seeds if s not in ran]

    def first(self, key: str) -> Any:
        """A descriptive value (method, r, lr, ...) from its first job that has it."""
        for j in self.done + self.jobs:
            value = j.lr if key == "lr" else j.metrics.get(key)
            if value is not None:
                return value
        return _override(list(self.key[1:]), key) if self.key[0] == "overrides" else None

    def values(self, metric: str) -> dict[int | None, float]:
        return {j.seed: j.measured()[metric] for j in self.done if metric in j.measured()}

    def summary(self, metric: str) -> Summary | None:
        values = list(self.values(metric).values())
        return summarize(values) if values else None

    def seeds_cell(self) -> str:
        """``completed/expected``, with what happened to the rest."""
        expected = max(len(self.expected_seeds), len(self.jobs))
        notes = [f"{self.failed} failed"] if self.failed else []
        running = len(self.jobs) - len(self.done) - self.failed
        notes += [f"{running} unfinished"] if running else []
        notes += [f"missing seed {', '.join(map(str, self.missing))}"] if self.missing else []
        return f"{len(self.done)}/{expected}" + (f" ({'; '.join(notes)})" if notes else "")


def grid_jobs(directory: Path) -> list[list[str]] | None:
    """Every job's overrides that the sweep in ``directory`` asked for (its ``multirun.yaml``),
    expanded as Hydra's basic sweeper expands them (so they read like each job's own)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = _config_value(Path(directory) / "multirun.yaml", ("hydra", "overrides", "task"))
    if not isinstance(task, list):
        return None
    try:
        parsed = OverridesParser.create().parse_overrides([str(o) for o in task])
        return BasicSweeper.split_arguments(parsed, None)[0]
    except Exception:  # noqa: BLE001  an Optuna search space, a grid this version cannot read
        return None


def group(jobs: list[Job], directory: Path | None = None) -> list[Config]:
    """The configurations of ``jobs`` in the order of their first job (module docstring)."""
    configs: dict[tuple, Config] = {}
    for job in jobs:
        parts = without_seed(job.overrides) if job.overrides is not None else list(job.key[1:])
        configs.setdefault(job.key, Config(job.key, parts)).jobs.append(job)
    seeds = sorted({j.seed for j in jobs if j.seed is not None})
    grid = grid_jobs(directory) if directory is not None else None
    if grid:
        for overrides in grid:
            key = ("overrides",) + tuple(sorted(without_seed(overrides)))
            configs.setdefault(key, Config(key, without_seed(overrides)))
            seed = _override(overrides, "seed")
            if seed is not None and int(seed) not in configs[key].expected_seeds:
                configs[key].expected_seeds.append(int(seed))
    for config in configs.values():
        if not config.expected_seeds:
            config.expected_seeds = list(seeds) if len(seeds) > 1 else []
    result = list(configs.values())
    _label(result)
    _select_lr(result)
    return result


def _label(configs: list[Config]) -> None:
    """Each configuration's label: the overrides that set it apart from the others."""
    shared = set.intersection(*(set(c.key[1:]) for c in configs)) if configs else set()
    for c in configs:
        parts = [p for p in c.parts if p not in shared]
        if c.key[0] == "fields":
            parts = [p for p in parts if not p.endswith("=None")]
        c.label = " ".join(parts) or (c.first("run_name") or str(c.jobs[0].path) if c.jobs else "")


def _select_lr(configs: list[Config]) -> None:
    """In each family with more than one learning rate, select the lowest mean val_loss."""
    families: dict[tuple, list[Config]] = {}
    for c in configs:
        if c.key[0] == "overrides":
            c.family = ("overrides",) + tuple(p for p in c.key[1:] if _name(p) not in LR_KEYS)
        else:
            c.family = tuple(p for p in c.key if not p.startswith("lr="))
        families.setdefault(c.family, []).append(c)
    for members in families.values():
        if len({c.first("lr") for c in members}) < 2:
            continue
        scored = [(s.mean, i) for i, c in enumerate(members) if (s := c.summary("val_loss")) is not None]
        best = min(scored)[1] if scored else None
        for i, c in enumerate(members):
            c.selected = i == best


def scored_split(configs: list[Config]) -> str:
    """``test`` when every completed job scored a held-out test split, else ``val``."""
    done = [j for c in configs for j in c.done]
    return "test" if done and all(j.metrics.get("test_loss") is not None for j in done) else "val"


def test_examples(configs: list[Config]) -> int | None:
    """The size of the test split the scores are on (the largest, should jobs differ)."""
    sizes = [j.metrics.get("test_examples") for c in configs for j in c.done]
    return max((n for n in sizes if isinstance(n, int)), default=None)


def task_metric(configs: list[Config]) -> tuple[str, str]:
    """The metric the comparison is about: exact match, accuracy, else loss (``(key, readable
    name)``), the first that every completed job has, on the test split when there is one
    (:func:`scored_split`)."""
    split = scored_split(configs)
    done = [j for c in configs for j in c.done]
    where = " (test)" if split == "test" else ""
    for score, name in (("exact_match", "exact match"), ("accuracy", "accuracy")):
        if done and all(j.metrics.get(f"{split}_{score}") is not None for j in done):
            return f"{split}_{score}", name + where
    return f"{split}_loss", "test loss" if split == "test" else "validation loss"


@dataclass
class Comparison:
    config: Config
    metric: str
    test: PairedTest


def baseline_config(configs: list[Config], name: str) -> Config | None:
    """The configuration of method ``name`` to compare against: among several (a rank grid, or
    learning rates), the selected one, else the lowest mean validation loss."""
    candidates = [c for c in configs if c.first("method") == name and c.done and c.selected is not False]
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c.summary("val_loss").mean if c.summary("val_loss") else float("inf")))


def compare(configs: list[Config], baseline: Config, metrics: list[str]) -> list[Comparison]:
    """A paired t-test of every other configuration against ``baseline`` for each metric,
    over the seeds both completed."""
    out = []
    for c in configs:
        if c is baseline:
            continue
        for metric in metrics:
            a, b = c.values(metric), baseline.values(metric)
            common = sorted(s for s in a if s in b and s is not None)
            if common:
                out.append(Comparison(c, metric, paired_t_test([a[s] for s in common], [b[s] for s in common])))
    return out
