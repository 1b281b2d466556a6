"""Resume: continue an interrupted run exactly where it stopped.

    python -m ftlab resume=RUN_DIR              # from the run's latest checkpoint
    python -m ftlab resume=RUN_DIR/checkpoints/step-40.ckpt
    python -m ftlab resume=last                 # the newest unfinished run under ./outputs

The run continues in its own directory with its own ``config.yaml``; the losses after the
restart equal those of a run that was never stopped (tests/test_resume.py). What that takes,
beyond the model, optimizer, scheduler and loop counters Lightning restores by itself:

- **method state**: the checkpoint holds ``Method.state_dict()`` (AdaLoRA's importance scores and
  rank pattern, Delta-LoRA's previous factors), restored by the LightningModule;
- **data position**: the training loader's order is a function of ``(seed, epoch)`` and its
  position is in the checkpoint (:mod:`ftlab.training.loaders`);
- **random state and history**: saved with every checkpoint and restored right before the
  first step after the restart (:class:`ftlab.training.checkpoints.RunState`).

This module finds the checkpoint and checks that it belongs to the run (:func:`resume_point`);
the command line that asks for it is parsed in :mod:`ftlab.cli`.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from ftlab.config import RunSettings
from ftlab.errors import ConfigError, UserError
from ftlab.rundir import CHECKPOINT_DIR, RunDir, read_metrics
from ftlab.training.checkpoints import check_identity, check_parameters, checkpoints, latest_checkpoint, read_checkpoint

# Keys a resumed run may change: none of them alters what is trained or in which order.
RESUMABLE_OVERRIDES = ("eval.", "logger.", "checkpoint.", "trainer.enable_progress_bar",
                       "trainer.log_every_n_steps")


@dataclass
class ResumePoint:
    """Where a resumed run starts: the checkpoint and what the first part of the run recorded."""

    run_dir: Path
    checkpoint: Path
    step: int
    ckpt: dict[str, Any] = field(repr=False)
    previous: dict[str, Any] = field(default_factory=dict, repr=False)  # the old metrics.json

    def initial_metrics(self) -> dict[str, Any]:
        """The before-training evaluation of the first part (``*_initial``)."""
        return {k: v for k, v in self.previous.items() if k.endswith("_initial")}

    def check_model(self, model: torch.nn.Module) -> None:
        check_parameters(self.ckpt, self.checkpoint, model)

    def keep_logs(self, trainer: L.Trainer) -> None:
        """Keep the csv logger's rows up to the checkpoint (it would start a fresh file), and
        Lightning quiet about the run's directories not being empty, as expected here."""
        from lightning.pytorch.loggers import CSVLogger

        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        for logger in trainer.loggers:
            if not isinstance(logger, CSVLogger):
                continue
            path = Path(logger.log_dir) / "metrics.csv"
            if not path.is_file():
                continue
            with path.open(newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if _step(r) < self.step]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Experiment logs directory")
                experiment = logger.experiment  # creating it empties the file
            experiment.metrics[:0] = [{k: v for k, v in r.items() if v != ""} for r in rows]


def _step(row: dict[str, str]) -> int:
    try:
        return int(float(row.get("step") or 0))
    except ValueError:
        return 0


def resume_point(value: str, run_dir: Path | None = None, overrides: list[tuple[str, str, str]] = ()
                 ) -> tuple[RunSettings, dict[str, Any], ResumePoint]:
    """``(settings, resolved config, resume point)`` for ``resume=value`` (a run directory, a
    checkpoint file or ``last``), with ``overrides`` (``(key, value text, raw argument)``) checked
    against and applied to the saved config.

    Reads and checks everything, writes nothing: a bad request leaves the run untouched."""
    from omegaconf import OmegaConf

    checkpoint = None
    if value == "last":
        run_dir = run_dir or _newest_run(Path("outputs"))
    else:
        target = Path(value).expanduser()
        if target.is_file():
            checkpoint = target
            if run_dir is None:
                if target.parent.name != CHECKPOINT_DIR:
                    raise UserError(f"cannot tell which run {target} belongs to (it is not in a run's "
                                    f"{CHECKPOINT_DIR}/ directory); add hydra.run.dir=<run dir>")
                run_dir = target.parent.parent
        elif target.is_dir():
            if run_dir is not None and run_dir.resolve() != target.resolve():
                raise UserError(f"resume={value} and hydra.run.dir={run_dir} name different runs")
            run_dir = target
        else:
            raise UserError(f"resume={value}: no such run directory or checkpoint file")
    run = RunDir.open(run_dir)
    cfg, config_path = run.cfg, run.config_path
    allowed = ", ".join(k + "*" if k.endswith(".") else k for k in RESUMABLE_OVERRIDES)
    # The run's own command line again (up-arrow + resume=..., a SLURM requeue) is no change.
    _check_unchanged([(key, raw) for key, _, raw in overrides
                      if not key.startswith(RESUMABLE_OVERRIDES) and key != "logger"],
                     OmegaConf.to_container(cfg, resolve=True), config_path, allowed)
    for key, text, raw in overrides:
        if key == "logger":  # a group choice (logger=none, logger=[csv,wandb]): its composed node
            OmegaConf.update(cfg, "logger", _compose([raw]).get("logger") or {}, merge=False)
            continue
        if not key.startswith(RESUMABLE_OVERRIDES):
            continue
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"unknown config key {key!r} in {config_path}")
        OmegaConf.update(cfg, key, yaml.safe_load(text) if text else None, merge=False)
    config, settings = run.config, run.settings
    run_dir = run.path
    previous = run.metrics
    if previous.get("status") == "completed":
        raise UserError(f"run {run_dir} already completed all its {previous.get('steps', '?')} steps; "
                        "nothing to resume (start a new run to train longer)")
    if checkpoint is not None:
        ckpt = read_checkpoint(checkpoint)
    else:
        checkpoint, ckpt = latest_checkpoint(run_dir)
    check_identity(ckpt, checkpoint, settings)
    point = ResumePoint(run_dir=run_dir, checkpoint=checkpoint, step=int(ckpt["global_step"]),
                        ckpt=ckpt, previous=previous)
    return settings, config, point


_UNSET = "(not set)"


def _check_unchanged(overrides: list[tuple[str, str]], saved: dict[str, Any], config_path: Path,
                     allowed: str) -> None:
    """Refuse unless every ``(key, raw override)`` gives the value the run was trained with.

    Hydra composes ``conf/`` with the overrides, as the first run did; compared with the saved
    config are the settings the overrides name (a group choice names its whole subtree, so
    ``model=tiny-llama`` matches a run whose model subtree is tiny-llama's) and every setting
    they move away from the defaults (a ``@package _global_`` option reaches beyond its group).
    """
    if not overrides:
        return
    try:
        composed, defaults = _compose([raw for _, raw in overrides]), _compose([])
    except Exception as err:  # noqa: BLE001  any composition error is the command line's
        first = " ".join(str(err).split())[:300]
        raise UserError(f"{' '.join(raw for _, raw in overrides)}: {first}") from None
    new, base, old = _leaves(composed), _leaves(defaults), _leaves(saved)
    keys = [key for key, _ in overrides]
    named = [p for key in keys for p in ([p for p in new if p == key or p.startswith(key + ".")] or [key])]
    moved = [p for p in new if new[p] != base.get(p, _UNSET)]
    for path in named + moved:
        if path.startswith(RESUMABLE_OVERRIDES) or path.split(".")[0] == "hydra":
            continue
        now, then = new.get(path, _UNSET), old.get(path, _UNSET)
        if now != then:
            owner = max((k for k in keys if path == k or path.startswith(k + ".")), key=len, default=path)
            raise UserError(f"{owner} cannot change when a run resumes: the run was trained with "
                            f"{path}={then!r}, the command line gives {path}={now!r} ({config_path}). "
                            f"Only {allowed} may be set; start a new run to change anything else")


def _compose(overrides: list[str]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from ftlab.settings import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("hydra", None)
    return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model.name": "tiny-llama", ...}``: a nested config as dotted paths to its values."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _newest_run(root: Path) -> Path:
    """The unfinished run under ``root`` (``outputs/<date>/<time>_...``) with the newest checkpoint."""
    best: tuple[float, Path] | None = None
    for ckpt_dir in root.glob(f"*/*/{CHECKPOINT_DIR}"):
        run_dir = ckpt_dir.parent
        if read_metrics(run_dir).get("status") == "completed":
            continue
        for path in checkpoints(run_dir):
            if best is None or path.stat().st_mtime > best[0]:
                best = (path.stat().st_mtime, run_dir)
    if best is None:
        raise UserError(f"resume=last found no unfinished run with a checkpoint under {root.resolve()}; "
                        "name it: resume=<run dir>")
    return best[1]
