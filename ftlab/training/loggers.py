"""Experiment loggers: csv (default), tensorboard, wandb (falls back to offline), any of them
together (``logger=[csv,wandb]``, ``logger=many``), or none."""

from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path
from typing import Any

from ftlab.config import LoggerSettings
from ftlab.training.dashboard import define_summaries, flat_config


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def build_logger(settings: LoggerSettings, run_dir: Path, run_name: str, group: str,
                 config: dict[str, Any], columns: dict[str, Any] | None = None) -> list:
    """The Lightning loggers of ``settings.names`` (an empty list for none). W&B gets the config
    flattened with ``columns`` at its top level, and best-value summaries (training/dashboard.py)."""
    loggers = []
    for name in settings.names:
        if name == "csv":
            from lightning.pytorch.loggers import CSVLogger

            loggers.append(CSVLogger(save_dir=str(run_dir), name="logs", version=""))
        elif name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
        else:
            loggers.append(_wandb_logger(settings, run_dir, run_name, group, config, columns or {}))
    return loggers


def _wandb_logger(settings: LoggerSettings, run_dir: Path, run_name: str, group: str,
                  config: dict[str, Any], columns: dict[str, Any]):
    from lightning.pytorch.loggers import WandbLogger

    offline = settings.offline or os.environ.get("WANDB_MODE") in ("offline", "disabled")
    if not offline:
        reason = ("no W&B credentials found" if not wandb_credentials_present()
                  else None if _reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
                  else "W&B server unreachable")
        if reason:
            offline = True
            os.environ["WANDB_MODE"] = "offline"  # said once per process, not once per job
            print(f"ftlab: {reason}; logging offline to {run_dir}/wandb. "
                  f"Sync later with: wandb sync {run_dir}/wandb/offline-run-*", file=sys.stderr)
    logger = WandbLogger(
        project=settings.project, entity=settings.entity, group=settings.group or group,
        name=settings.run_name or run_name, tags=list(settings.tags), save_dir=str(run_dir),
        offline=offline,
    )
    define_summaries(logger.experiment)  # after Lightning's own step-metric definitions
    logger.log_hyperparams(flat_config(config, columns))
    return logger


def logged_to(loggers: list) -> dict[str, Any]:
    """``{"wandb": {project, entity, group, run_id, mode}}`` for metrics.json when the run logs to
    W&B (``ftlab report DIR --wandb`` logs the report to the same group), else ``{}``."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            return {"wandb": {"project": run.project, "entity": run.entity or None, "group": run.group,
                              "run_id": run.id, "mode": "offline" if run.offline else "online"}}
    return {}


def _reachable(url: str, timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def finish_logger(loggers: list, result: dict[str, Any]) -> None:
    """Final numbers as run summary, sample generations as a table, and close the run (each
    job of a multirun is its own W&B run)."""
    from lightning.pytorch.loggers import WandbLogger

    summary = {k: v for k, v in result.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
    for logger in loggers:
        logger.log_metrics({f"final/{k}": v for k, v in summary.items()})
        if isinstance(logger, WandbLogger):
            import wandb

            for key, value in summary.items():
                logger.experiment.summary[key] = value
            for when in ("_initial", ""):
                samples = result.get(f"samples{when}") or []
                if samples:
                    logger.log_table(key=f"samples{when or '_final'}",
                                     columns=["prompt", "prediction", "reference"],
                                     data=[[s["prompt"], s["prediction"], s["reference"]] for s in samples])
            logger.finalize("success")
            wandb.finish()
        else:
            logger.finalize("success")
