"""W&B as a dashboard out of the box: what ftlab tells W&B beyond what Lightning's logger does.

- ``define_summaries``: the run summary of each validation metric is its best value over the
  run (``val/loss`` the minimum, accuracies and F1 the maximum), so the runs table, parallel
  coordinates and scatter panels show the best validation, not the last logged one;
- ``flat_config``: the config W&B receives, with the columns a comparison is made of at the
  top level (method, r, alpha, lr, precision, quantization, seed, model, data) and every other
  setting flattened to ``group/key`` (``method/target_modules``, ``optimizer/weight_decay``);
- ``log_report``: a sweep's report (its tables and plots, from ``ftlab report DIR --wandb``)
  logged as one more run of the sweep's W&B group, ``job_type=report``.

W&B is imported only by the functions that need it (given a run object, nothing is imported).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from ftlab.config import RunSettings

STEP = "trainer/global_step"  # Lightning's step metric for W&B
# The validation metrics FinetuneModule logs, with the direction that makes a value better.
SUMMARIES = {"val/loss": "min", "val/perplexity": "min", "val/token_accuracy": "max",
             "val/accuracy": "max", "val/f1": "max"}


def define_summaries(run) -> None:
    """Each validation metric's summary is its best value (``SUMMARIES``). The step metric is
    repeated: a metric defined by name no longer follows the ``*`` glob Lightning defined."""
    for name, best in SUMMARIES.items():
        run.define_metric(name, step_metric=STEP, summary=best)


def run_columns(s: RunSettings, quantization: str) -> dict[str, Any]:
    """The columns runs are compared by: top-level keys of the W&B config (and of metrics.json)."""
    return {"method": s.method["name"], "r": s.method.get("r"), "alpha": s.method.get("alpha"),
            "lr": s.optimizer.lr, "precision": str(s.hardware.precision), "quantization": quantization,
            "seed": s.seed, "model": s.model.name, "data": s.data.name}


def flat_config(config: dict[str, Any], columns: dict[str, Any]) -> dict[str, Any]:
    """``columns`` first, then every leaf of the resolved ``config`` as ``a/b/c`` (lists kept as
    values), so no setting hides inside a nested dict and no key collides with a column."""
    flat: dict[str, Any] = dict(columns)

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}/{key}" if prefix else str(key), value)
        elif prefix not in flat:
            flat[prefix] = node

    walk("", config)
    return flat


def log_report(directory: Path, where: dict[str, Any], wandb=None) -> str:
    """Log the report files ``ftlab.report`` wrote into ``directory`` (``jobs.csv``,
    ``report.csv``, ``report.md`` and the plots) to W&B as a run of ``where``'s project, entity
    and group (the sweep's jobs' own, :func:`wandb_target`); returns the run's path or the
    local directory of an offline run. ``wandb``: the module (tests pass a fake)."""
    if wandb is None:
        import wandb
    directory = Path(directory)
    run = wandb.init(project=where.get("project"), entity=where.get("entity"), group=where.get("group"),
                     job_type="report", name=f"report-{where.get('group') or directory.name}",
                     dir=str(directory), mode=where.get("mode") or "online")
    payload: dict[str, Any] = {}
    for name in ("jobs", "report"):
        path = directory / f"{name}.csv"
        if path.is_file():
            with open(path, newline="") as fh:
                rows = list(csv.reader(fh))
            if rows:
                payload[f"report/{name}"] = wandb.Table(columns=rows[0], data=rows[1:])
    for name in ("val_loss_curves", "pareto"):
        if (directory / f"{name}.png").is_file():
            payload[f"report/{name}"] = wandb.Image(str(directory / f"{name}.png"))
    run.log(payload)
    if (directory / "report.md").is_file():
        run.summary["report_md"] = (directory / "report.md").read_text()
    where_logged = str(Path(run.dir).parent) if where.get("mode") == "offline" else str(run.path)
    run.finish()
    return where_logged


def wandb_target(jobs_metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Project, entity, group and mode the jobs logged to (``wandb`` in their metrics.json):
    the group most of them used; None when no job was logged to W&B."""
    seen = [m["wandb"] for m in jobs_metrics if isinstance(m.get("wandb"), dict)]
    if not seen:
        return None
    groups = [w.get("group") for w in seen]
    group = max(set(groups), key=groups.count)
    target = next(w for w in seen if w.get("group") == group)
    offline = os.environ.get("WANDB_MODE") in ("offline", "disabled") or target.get("mode") == "offline"
    return {**target, "mode": "offline" if offline else "online"}
