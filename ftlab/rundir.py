"""Reading a run directory: its saved config, its metrics and what it trained.

Every run writes ``config.yaml`` (resolved), ``metrics.json``, ``checkpoints/`` and the
artifact its method saves (``adapter/``, or ``model/`` for full fine-tuning; see
``Method.traits.artifact``). Evaluation, export, resume and the report read runs through
:class:`RunDir` and nothing else, so a run's layout is written down once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ftlab.config import RunSettings
from ftlab.errors import UserError
from ftlab.io import read_json

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
TRAIN_LOG = "train.log"  # what the run printed (data, parameters, results, warnings, errors)


@dataclass
class RunDir:
    """A run directory written by ``python -m ftlab``; opening it checks that it is one."""

    path: Path
    _cfg: Any = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        from omegaconf import OmegaConf

        path = Path(path)
        if not path.is_dir():
            raise UserError(f"{path}: no such run directory")
        config = path / CONFIG_FILE
        if not config.is_file():
            raise UserError(f"{path} is not an ftlab run directory (no {CONFIG_FILE}); "
                            "name the directory a run wrote")
        try:
            cfg = OmegaConf.load(config)
        except Exception as err:  # noqa: BLE001  a damaged or hand-edited file
            raise UserError(f"{config} cannot be read: {' '.join(str(err).split())[:200]}") from None
        return cls(path, cfg)

    @property
    def cfg(self):
        """The saved config as an OmegaConf ``DictConfig`` (overrides on resume edit it)."""
        return self._cfg

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @cached_property
    def settings(self) -> RunSettings:
        from ftlab.settings import settings_from_config

        s = settings_from_config(self._cfg, str(self.path))
        # budget.trainable_params chose the method's size when the run started (metrics.json
        # records it): what was trained has that size, not the one config.yaml names.
        chosen = self.metrics.get("budget") or {}
        if chosen.get("knob") and chosen.get("value") is not None:
            s = dataclasses.replace(s, method={**s.method, chosen["knob"]: chosen["value"]})
        return s

    @property
    def config(self) -> dict[str, Any]:
        """The saved config, resolved to plain containers."""
        from ftlab.settings import resolved

        return resolved(self._cfg)

    @property
    def metrics(self) -> dict[str, Any]:
        """``metrics.json`` as it is now (``{}`` before the run wrote one)."""
        return read_metrics(self.path)

    def method(self):
        """A fresh method object built from the run's settings."""
        from ftlab.methods import method_from_spec

        return method_from_spec(self.settings.method)

    def artifact(self, best: bool = False) -> Path:
        """The directory ``Method.save`` wrote at the end of training; ``best``: the model of
        the best validation instead (``best_adapter/`` unless that was the last one)."""
        if best:
            info = self.metrics.get("best") or {}
            if not info.get("adapter"):
                raise UserError(f"{self.path} recorded no best model (monitor.keep_best=false, no "
                                "validation during training, or the run did not finish); drop --best "
                                "for the last one")
            return self.path / info["adapter"]
        artifact = self.path / self.method().traits.artifact
        if not artifact.is_dir() or not any(artifact.iterdir()):
            raise UserError(
                f"{self.path} holds no trained model ({artifact.name}/ is missing): the run did not "
                f"finish. Continue it with `python -m ftlab resume={self.path}`, or score the untrained "
                "base with --base")
        return artifact


@dataclass
class LoadedRun:
    """A run's model rebuilt on this machine: settings, method, model, tokenizer, class labels."""

    settings: RunSettings
    method: Any
    model: Any
    tokenizer: Any
    labels: list[str] | None


def load_run(run_dir: str | Path, base: bool = False, best: bool = False) -> LoadedRun:
    """The run's model as it was at the end of training (``base``: the untrained base model;
    ``best``: at its best validation). The run's own hardware is not needed: a run trained on
    GPUs can be evaluated or exported on a laptop, as long as its base weights are here."""
    from ftlab.methods.quantized import base_quantization
    from ftlab.models import check_available, load_model

    run = RunDir.open(run_dir)
    settings, method = run.settings, run.method()
    check_available(settings.model)
    artifact = None if base else run.artifact(best)
    labels = class_labels(settings)
    model_settings = dataclasses.replace(
        settings.model, quantization=base_quantization(method, settings.model.quantization))
    model, tokenizer = load_model(model_settings, seed=settings.seed, labels=labels)
    if artifact is not None:
        try:
            model = method.load(model, artifact)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise UserError(f"{artifact} cannot be loaded as a {settings.method['name']} model: "
                            f"{' '.join(str(err).split())[:300]}") from None
    model.eval()
    return LoadedRun(settings, method, model, tokenizer, labels)


def class_labels(settings: RunSettings) -> list[str] | None:
    """A classification run's classes, in the run's order (what its head's outputs mean)."""
    if settings.data.format != "classification":
        return None
    from ftlab.data import DataModule

    own = DataModule(settings.data, tokenizer=None)
    own.check_files()
    return own.labels


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    """A run's ``metrics.json`` so far (``{}`` if there is none or it cannot be read)."""
    return read_json(Path(run_dir) / METRICS_FILE)
