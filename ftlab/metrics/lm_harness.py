"""Standard benchmarks through EleutherAI's lm-evaluation-harness (``lm-eval``, the optional
extra ``pip install 'ftlab[lmeval]'``), and the ``lm_eval.json`` file that records them in a run.

The model is passed to lm-eval as an object (``lm_eval.models.huggingface.HFLM(pretrained=model,
tokenizer=...)``), so lm-eval scores exactly what ftlab trained and reloaded, adapter and all.
Task names are lm-eval's (``hellaswag``, ``arc_easy``, ``gsm8k``, ...); a directory of task YAML
files (``tasks_dir``) adds custom tasks. In a task from that directory a relative
``dataset_kwargs.data_files`` path is read relative to the YAML file (lm-eval itself would
read it relative to the working directory), so a task directory travels with its data.

``lm_eval.json`` holds, per task: every metric with its standard error, the number of
documents scored (``n``, of ``n_total``), the few-shot count, the limit, the task's version,
a SHA-256 of its resolved config (without lm-eval's ``metadata``) and of the documents scored,
the lm-eval version and the date. Running more tasks later adds them to the file; running a task
again replaces its entry. :func:`read_columns` flattens the file into the report's columns
(``<task>/<metric>``, with ``/<filter>`` where lm-eval names a filter other than ``none``).

Nothing here imports ``lm_eval`` at module level: ftlab works without the extra.
"""

from __future__ import annotations

import copy
import datetime
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftlab.errors import UserError
from ftlab.io import read_json, write_json

LM_EVAL_FILE = "lm_eval.json"
SAMPLES_DIR = "lm_eval_samples"
INSTALL = "pip install 'ftlab[lmeval]'"
# lm-eval metrics that are fractions in [0, 1] (the report prints them as percentages).
FRACTIONS = {"acc", "acc_norm", "acc_mutual_info", "exact_match", "em", "f1", "mc1", "mc2", "contains"}


def require_lm_eval():
    """The ``lm_eval`` package, or a :class:`UserError` saying how to install it."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401  the API ftlab uses, not just the name
    except ImportError as err:
        raise UserError(f"--lm-eval needs lm-evaluation-harness, which is not installed here ({err}); "
                        f"{INSTALL}") from None
    return lm_eval


def lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return str(getattr(require_lm_eval(), "__version__", "unknown"))


def parse_tasks(text: str) -> list[str]:
    """``"hellaswag, arc_easy"`` -> ``["hellaswag", "arc_easy"]`` (order kept, duplicates dropped)."""
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        raise UserError("--lm-eval needs at least one task name, e.g. --lm-eval hellaswag,arc_easy")
    return names


@dataclass
class Harness:
    """What to run: lm-eval task names and the options of ``lm_eval.simple_evaluate``."""

    tasks: list[str]
    tasks_dir: Path | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int | str = 8
    log_samples: bool = False
    _objects: list[Any] = field(default_factory=list, repr=False)
    _manager: Any = field(default=None, repr=False)
    _sources: dict[str, str] = field(default_factory=dict, repr=False)

    def prepare(self) -> None:
        """Find every task and load its documents, before any model weights are read: an
        unknown name or a data set that cannot be read ends here (:class:`UserError`).

        lm-eval's own task index (thousands of YAML files) takes seconds to build, so the tasks
        directory is searched first and the built-in tasks only for names not found there."""
        require_lm_eval()
        from lm_eval.tasks import TaskManager

        if self.tasks_dir is not None and not Path(self.tasks_dir).is_dir():
            raise UserError(f"--lm-eval-tasks-dir {self.tasks_dir}: no such directory")
        manager = None
        if self.tasks_dir is not None:
            manager = TaskManager(include_path=str(self.tasks_dir), include_defaults=False)
        if manager is None or any(_entry(manager, t) is None for t in self.tasks):
            manager = TaskManager(include_path=str(self.tasks_dir) if self.tasks_dir else None)
        if unknown := [t for t in self.tasks if _entry(manager, t) is None]:
            known = list(manager.all_tasks) + list(manager.all_groups) + list(manager.all_tags)
            hints = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
            said = "; ".join(f"{t!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items())
            raise UserError(f"--lm-eval: unknown lm-eval task {said}; `lm-eval ls tasks` lists the "
                            "built-in ones" + ("" if self.tasks_dir else ", --lm-eval-tasks-dir DIR adds your own"))
        self._manager = manager
        self._objects = []
        for name in self.tasks:
            try:
                loaded = manager.load([self._spec(manager, name)])
            except Exception as err:  # noqa: BLE001  lm-eval and datasets raise many kinds
                raise UserError(f"lm-eval cannot load task {name!r}: {type(err).__name__}: "
                                f"{' '.join(str(err).split())[:300]} (offline, a task's data set must already "
                                "be in the Hugging Face datasets cache, or be local files)") from None
            top = loaded["groups"].get(name) or loaded["tasks"].get(name)
            self._objects.extend([top] if top is not None else loaded["tasks"].values())

    def _spec(self, manager, name: str) -> str | dict[str, Any]:
        """The task's name, or, for a task YAML in ``tasks_dir`` that names a data file relative
        to itself, its config with that path made absolute."""
        entry = _entry(manager, name)
        path = getattr(entry, "yaml_path", None)
        if self.tasks_dir is None or path is None or Path(self.tasks_dir).resolve() not in Path(path).resolve().parents:
            return name
        from lm_eval.tasks._yaml_loader import load_yaml

        config = load_yaml(path, resolve_func=True)
        kwargs = config.get("dataset_kwargs") or {}
        files = kwargs.get("data_files")
        self._sources[name] = str(Path(path).resolve())
        if files is None or "task" not in config or "group" in config:
            return name
        config = copy.copy(config)
        config["dataset_kwargs"] = {**kwargs, "data_files": _beside(files, Path(path).parent)}
        return config

    def run(self, model, tokenizer) -> dict[str, Any]:
        """Score ``model`` on the prepared tasks; returns lm-eval's results dictionary."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        if not self._objects:
            self.prepare()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
        try:
            return lm_eval.simple_evaluate(model=lm, tasks=list(self._objects), task_manager=self._manager,
                                           num_fewshot=self.num_fewshot, limit=self.limit,
                                           batch_size=self.batch_size, log_samples=True)
        except (ValueError, KeyError, TypeError) as err:  # a task this model cannot run
            raise UserError(f"lm-eval failed: {type(err).__name__}: {' '.join(str(err).split())[:300]}") from None

    def entries(self, results: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Per task (and group) of lm-eval's ``results``: what ``lm_eval.json`` records."""
        version, date = lm_eval_version(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        out = {}
        for task, values in results.get("results", {}).items():
            metrics: dict[str, dict[str, float | None]] = {}
            for key, value in values.items():
                if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                    continue
                metric, filt = key.split(",", 1)
                stderr = values.get(f"{metric}_stderr,{filt}")
                name = metric if filt == "none" else f"{metric}/{filt}"
                metrics[name] = {"value": float(value),
                                 "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
            counts = results.get("n-samples", {}).get(task, {})
            config = results.get("configs", {}).get(task)
            samples = results.get("samples", {}).get(task) or []
            entry = {"metrics": metrics,
                     "n": counts.get("effective", values.get("sample_len")),
                     "n_total": counts.get("original"),
                     "num_fewshot": results.get("n-shot", {}).get(task),
                     "limit": self.limit,
                     "task_version": results.get("versions", {}).get(task),
                     "output_type": (config or {}).get("output_type"),
                     "config_sha256": _digest({k: v for k, v in config.items() if k != "metadata"})
                     if config else None,
                     "docs_sha256": _digest([s.get("doc_hash") for s in samples]) if samples else None,
                     "source": self._sources.get(task, "lm-eval"),
                     "lm_eval_version": version, "date": date}
            if subtasks := results.get("group_subtasks", {}).get(task):
                entry["subtasks"] = list(subtasks)
            out[task] = entry
        return out


def _entry(manager, name: str):
    index = manager.task_index
    return index.get(name) if hasattr(index, "get") else None


def _beside(files, directory: Path):
    """``data_files`` (a path, a list, or a split -> path(s) mapping) with each relative path that
    exists beside the YAML made absolute; other paths are left to lm-eval."""
    if isinstance(files, dict):
        return {k: _beside(v, directory) for k, v in files.items()}
    if isinstance(files, (list, tuple)):
        return [_beside(f, directory) for f in files]
    if isinstance(files, str) and not Path(files).is_absolute() and "://" not in files \
            and (directory / files).exists():
        return str((directory / files).resolve())
    return files


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def write_results(run_dir: Path, entries: dict[str, dict[str, Any]], about: dict[str, Any],
                  file: str = LM_EVAL_FILE) -> Path:
    """Add ``entries`` to ``run_dir/file`` (tasks run before and not now are kept)."""
    path = Path(run_dir) / file
    old = read_json(path)
    tasks = {**(old.get("tasks") or {}), **entries}
    write_json(path, {**about, "tasks": tasks})
    return path


def write_samples(run_dir: Path, results: dict[str, Any], name: str = SAMPLES_DIR) -> Path:
    """lm-eval's per-document log (prompt, choices, log-likelihoods or answer, metrics), one JSONL
    file per task under ``run_dir/lm_eval_samples/``."""
    directory = Path(run_dir) / name
    directory.mkdir(exist_ok=True)
    for task, samples in (results.get("samples") or {}).items():
        text = "".join(json.dumps(s, default=str) + "\n" for s in samples)
        (directory / f"{task.replace('/', '_')}.jsonl").write_text(text)
    return directory


def column(task: str, metric: str) -> str:
    """The report's column for one metric of one task."""
    return f"{task}/{metric}"


def read_columns(run_dir: str | Path) -> dict[str, float]:
    """``lm_eval.json`` of a run as report columns: ``{"hellaswag/acc_norm": 0.31, ...}``
    (``{}`` where the run has none)."""
    data = read_json(Path(run_dir) / LM_EVAL_FILE)
    out = {}
    for task, entry in (data.get("tasks") or {}).items():
        for metric, value in (entry.get("metrics") or {}).items():
            if isinstance(value, dict) and isinstance(value.get("value"), (int, float)):
                out[column(task, metric)] = float(value["value"])
    return out


def is_fraction(name: str) -> bool:
    """Whether a report column of lm-eval holds a fraction in [0, 1] (``arc_easy/acc``)."""
    parts = name.split("/")
    return len(parts) >= 2 and parts[1] in FRACTIONS


def summary(entries: dict[str, dict[str, Any]]) -> str:
    """The printed table: one line per task and metric."""
    lines = ["", f"  {'lm-eval task':24} {'metric':22} {'value':>9} {'stderr':>9} {'n':>7}"]
    for task, entry in entries.items():
        for metric, v in entry["metrics"].items():
            fmt = "{:.1%}" if metric.split("/")[0] in FRACTIONS else "{:.4g}"
            err = "" if v["stderr"] is None else fmt.format(v["stderr"])
            lines.append(f"  {task:24} {metric:22} {fmt.format(v['value']):>9} {err:>9} {entry['n'] or '':>7}")
    return "\n".join(lines)
