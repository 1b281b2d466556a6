"""Typed run settings.

The Hydra entry point (:mod:`ftlab.cli`) is the only place that sees a ``DictConfig``. It
converts the composed config into these dataclasses, whose ``__post_init__`` checks the values
where they are defined, so every piece below the entry point is called with plain typed
arguments and can be used from Python without Hydra.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ftlab.errors import ConfigError, check_choice, check_fraction, check_positive, did_you_mean
from ftlab.inputs import (DATA_FORMATS, DTYPES, FORMAT_FIELDS, MODEL_SOURCES, MODEL_TASKS,  # noqa: F401
                          QUANTIZATIONS, TEMPLATES, DataSettings, ModelSettings)

SCHEDULERS = ("constant", "linear", "cosine")
LOGGERS = ("csv", "tensorboard", "wandb")  # any of them, together (none: an empty tuple)
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_find_unused_parameters_true")
SHARDED_STRATEGIES = ("fsdp", "deepspeed")
STRATEGIES = ("auto", *DDP_STRATEGIES, *SHARDED_STRATEGIES)


@dataclass
class OptimizerSettings:
    """A partially applied optimizer class (``_target_`` + ``_partial_: true`` in config).

    ``factory(param_groups)`` builds it; ``lr`` is kept apart because methods scale it per group
    (LoRA+ gives B a larger learning rate) whatever the optimizer class.
    """

    factory: Callable[..., Any]
    lr: float
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_positive("optimizer.lr", self.lr)
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay!r}")


@dataclass
class SchedulerSettings:
    """Learning-rate schedule over optimizer steps, with linear warmup."""

    name: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_choice("scheduler.name", self.name, SCHEDULERS)
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"scheduler.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        check_fraction("scheduler.warmup_ratio", self.warmup_ratio)
        check_fraction("scheduler.min_lr_ratio", self.min_lr_ratio, closed_high=True)
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError("set scheduler.warmup_steps or scheduler.warmup_ratio, not both")

    def warmup(self, total_steps: int) -> int:
        return self.warmup_steps or int(math.ceil(self.warmup_ratio * total_steps))


@dataclass
class HardwareSettings:
    """Where and how a run trains (``conf/hardware/*.yaml``); see :mod:`ftlab.training.hardware`.

    Checks of the values alone happen here; checks of combinations with the model and method,
    and of this machine (GPUs, bf16 support), in :func:`ftlab.training.hardware.check_hardware`."""

    name: str = "cpu"
    accelerator: str = "cpu"
    devices: int | str | list[int] = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_nodes: int = 1
    # Passed to Lightning's FSDPStrategy / DeepSpeedStrategy (e.g. sharding_strategy, stage).
    strategy_options: dict[str, Any] = field(default_factory=dict)
    # Recompute each decoder layer's activations in backward instead of storing them.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_choice("hardware.accelerator", self.accelerator, ACCELERATORS)
        check_choice("hardware.precision", str(self.precision), PRECISIONS)
        check_choice("hardware.strategy", self.strategy, STRATEGIES)
        check_positive("hardware.num_nodes", self.num_nodes, integer=True)
        devices = self.devices
        ok = (devices in ("auto", -1) or (isinstance(devices, int) and not isinstance(devices, bool)
                                         and devices > 0)
              or (isinstance(devices, list) and devices and all(isinstance(d, int) for d in devices)))
        if not ok:
            raise ConfigError(f"hardware.devices must be a positive integer, a list of device "
                              f"indices, auto or -1; got {devices!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(f"hardware.gradient_checkpointing must be true or false, "
                              f"got {self.gradient_checkpointing!r}")
        if self.strategy_options and self.strategy not in SHARDED_STRATEGIES:
            raise ConfigError(f"hardware.strategy_options is only read by fsdp and deepspeed, "
                              f"not by strategy={self.strategy}")
        if self.strategy == "deepspeed":
            check_choice("hardware.strategy_options.stage", self.strategy_options.get("stage", 2), (1, 2, 3))


@dataclass
class DryRunSettings:
    """``dry_run=true``: plan the run (parameters, memory per device) without weights or data.

    ``dry_run=true`` on the command line is short for ``dry_run.enabled=true``.
    ``device_memory_gb`` (GiB) is the memory of one device the plan is judged against; unset,
    the plan uses the local GPU's memory if there is one, and gives no verdict otherwise."""

    enabled: bool = False
    device_memory_gb: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"dry_run must be true or false, got {self.enabled!r}")
        if self.device_memory_gb is not None:
            check_positive("dry_run.device_memory_gb", self.device_memory_gb)


@dataclass
class LossSettings:
    """``loss.chunk_size``: scored tokens per chunk of the chunked cross-entropy, which never
    holds the logits of more than one chunk (:mod:`ftlab.training.loss`); 0: all logits at once."""

    chunk_size: int = 1024

    def __post_init__(self) -> None:
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 0:
            raise ConfigError(f"loss.chunk_size must be an integer >= 0 (0: no chunking), got {self.chunk_size!r}")


# What validation logs, by data format: the metrics a run can monitor.
MONITORABLE = {"causal_lm": ("val/loss", "val/perplexity", "val/token_accuracy"),
               "seq_cls": ("val/loss", "val/accuracy", "val/f1")}


@dataclass
class MonitorSettings:
    """The validation metric that picks the best checkpoint and drives early stopping.

    ``mode``: ``min``, ``max``, or ``auto`` (max for accuracies and F1, min for loss and
    perplexity). ``patience``: stop after this many validations in a row without an improvement
    of more than ``min_delta``; ``null`` turns early stopping off. ``keep_best``: keep
    ``checkpoints/best.ckpt`` and write the best model's adapter to ``best_adapter/``."""

    metric: str = "val/loss"
    mode: str = "auto"
    patience: int | None = None
    min_delta: float = 0.0
    keep_best: bool = True

    def __post_init__(self) -> None:
        known = sorted({m for ms in MONITORABLE.values() for m in ms})
        if self.metric not in known:
            raise ConfigError(f"monitor.metric={self.metric!r} is not a metric ftlab logs"
                              f"{did_you_mean(self.metric, known)}; validation logs: {', '.join(known)}")
        check_choice("monitor.mode", self.mode, ("auto", "min", "max"))
        if self.patience is not None:
            check_positive("monitor.patience", self.patience, integer=True)
        if isinstance(self.min_delta, bool) or not isinstance(self.min_delta, (int, float)) or self.min_delta < 0:
            raise ConfigError(f"monitor.min_delta must be a number >= 0, got {self.min_delta!r}")
        if not isinstance(self.keep_best, bool):
            raise ConfigError(f"monitor.keep_best must be true or false, got {self.keep_best!r}")

    @property
    def direction(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "max" if self.metric.endswith(("accuracy", "f1")) else "min"


@dataclass
class LoggerSettings:
    """The experiment loggers of a run, in order (``logger=[csv,wandb]``), and W&B's options."""

    names: tuple[str, ...] = ("csv",)
    project: str = "ftlab"
    entity: str | None = None
    group: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    offline: bool = False

    def __post_init__(self) -> None:
        for name in self.names:
            check_choice("logger", name, LOGGERS + ("none",) if len(self.names) == 1 else LOGGERS)
        self.names = tuple(n for n in self.names if n != "none")


@dataclass
class EvalSettings:
    """Held-out evaluation before and after training."""

    before: bool = True
    generate: bool = True
    max_new_tokens: int = 16
    max_examples: int = 64
    show_samples: int = 4
    # Reuse the "before" scores of an earlier run with the same base model, data, evaluation
    # and precision when the method leaves the model unchanged at initialisation.
    cache_before: bool = True

    def __post_init__(self) -> None:
        check_positive("eval.max_new_tokens", self.max_new_tokens, integer=True)
        check_positive("eval.max_examples", self.max_examples, integer=True)


@dataclass
class RunSettings:
    """Everything one run needs, as plain values."""

    run_dir: str
    method: dict[str, Any]
    model: ModelSettings
    data: DataSettings
    optimizer: OptimizerSettings
    scheduler: SchedulerSettings
    hardware: HardwareSettings
    logger: LoggerSettings
    eval: EvalSettings
    trainer: dict[str, Any]
    seed: int = 42
    dry_run: DryRunSettings = field(default_factory=DryRunSettings)
    checkpoint_every_n_steps: int | None = 50
    sweep_name: str | None = None
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    # Extra Lightning callbacks by name: ``{_target_: import.path.Class, **kwargs}`` each.
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Modules imported before anything is built, where methods from outside ftlab register.
    plugins: list[str] = field(default_factory=list)
    # budget.trainable_params: size the method to about this many (ftlab/planning/budget.py).
    budget: int | None = None

    def __post_init__(self) -> None:
        _check_trainer_args(self.trainer)
        if self.budget is not None:
            check_positive("budget.trainable_params", self.budget, integer=True)
        for name, spec in self.callbacks.items():
            if spec is not None and not (isinstance(spec, dict) and isinstance(spec.get("_target_"), str)):
                raise ConfigError(f"callbacks.{name} must be a mapping with _target_: <import path of a "
                                  f"lightning Callback class>, got {spec!r}")
        self._check_monitor()
        self._check_warmup()
        wants = "seq_cls" if self.data.format == "classification" else "causal_lm"
        if wants not in self.model.tasks:
            raise ConfigError(
                f"data.format={self.data.format} trains a {wants} head, which model "
                f"{self.model.name!r} does not have (its heads: {', '.join(self.model.tasks)})"
                + ("; use data=classification, or data.format=classification with your own file"
                   if wants == "causal_lm" else ""))
        if self.model.task != wants:
            raise ConfigError(
                f"data.format={self.data.format} trains model.task={wants}, but model.task="
                f"{self.model.task}; add model.task={wants}"
                + (" (a sequence-classification head over the model)" if wants == "seq_cls" else ""))

    @property
    def max_steps(self) -> int:
        return int(self.trainer.get("max_steps", -1) or -1)

    @property
    def validates(self) -> bool:
        """False when ``trainer.limit_val_batches=0``, the way to turn validation off."""
        return not validation_off(self.trainer)

    def _check_monitor(self) -> None:
        """The monitored metric must be one this run's validation logs, and early stopping
        needs validation to run during training."""
        task = "seq_cls" if self.data.format == "classification" else "causal_lm"
        logged = MONITORABLE[task]
        m = self.monitor
        if m.metric not in logged:
            raise ConfigError(f"monitor.metric={m.metric} is never logged by a run on "
                              f"data.format={self.data.format}; its validation logs: {', '.join(logged)}")
        if m.patience is None:
            return
        interval = self.trainer.get("val_check_interval")
        if validation_off(self.trainer):
            raise ConfigError(f"monitor.patience={m.patience} (early stopping) needs validation, but "
                              "trainer.limit_val_batches=0 turns it off")
        if isinstance(interval, int) and self.max_steps > 0 and interval > self.max_steps:
            raise ConfigError(
                f"monitor.patience={m.patience} (early stopping on {m.metric}): trainer.val_check_interval="
                f"{interval} is more than trainer.max_steps={self.max_steps}, so {m.metric} is never "
                "logged during training; lower trainer.val_check_interval")

    def _check_warmup(self) -> None:
        """Warmup longer than the run never reaches the configured learning rate. (Runs sized
        in epochs are checked once the data's size is known, in :mod:`ftlab.run`.)"""
        if self.max_steps > 0:
            check_warmup(self.scheduler, self.max_steps)


def check_warmup(schedule: SchedulerSettings, total_steps: int) -> None:
    warmup = schedule.warmup(total_steps)
    if warmup >= total_steps:
        given = (f"scheduler.warmup_steps={schedule.warmup_steps}" if schedule.warmup_steps
                 else f"scheduler.warmup_ratio={schedule.warmup_ratio}")
        raise ConfigError(f"{given} warms up for {warmup} optimizer steps, but the run takes "
                          f"{total_steps}: the learning rate would never reach optimizer.lr; "
                          "shorten the warmup or train longer")


def validation_off(trainer: dict[str, Any]) -> bool:
    limit = trainer.get("limit_val_batches")
    return isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit == 0


def _check_trainer_args(trainer: dict[str, Any]) -> None:
    import lightning

    valid = set(inspect.signature(lightning.Trainer.__init__).parameters) - {"self"}
    owned = {"accelerator", "devices", "strategy", "precision", "num_nodes", "logger",
             "callbacks", "default_root_dir"}
    for key in trainer:
        if key in owned:
            raise ConfigError(
                f"trainer.{key} is set by ftlab; use "
                + {"logger": "logger=", "callbacks": "callbacks.<name>._target_=<class>",
                   "default_root_dir": "hydra.run.dir="}.get(key, f"hardware.{key}") + " instead"
            )
        if key not in valid:
            raise ConfigError(
                f"trainer.{key} is not a lightning.Trainer argument{did_you_mean(key, valid)}"
            )
    steps = trainer.get("max_steps", -1)
    epochs = trainer.get("max_epochs", -1)
    if steps is not None and steps != -1:
        check_positive("trainer.max_steps", steps, integer=True)
    if (steps in (None, -1)) and (epochs in (None, -1)):
        raise ConfigError("set trainer.max_steps or trainer.max_epochs (both are unlimited)")
    if epochs is not None and epochs != -1 and (isinstance(epochs, bool) or not isinstance(epochs, int)
                                                or epochs < 1):
        raise ConfigError(f"trainer.max_epochs must be a positive integer or -1 (unlimited), got "
                          f"{epochs!r}" + ("; 0 would train nothing" if epochs == 0 else ""))
    _check_batch_limits(trainer)
    for key in ("accumulate_grad_batches", "log_every_n_steps"):
        if key in trainer and trainer[key] is not None:
            check_positive(f"trainer.{key}", trainer[key], integer=True)
    clip = trainer.get("gradient_clip_val")
    if clip is not None:
        check_positive("trainer.gradient_clip_val", clip)


def _check_batch_limits(trainer: dict[str, Any]) -> None:
    """Lightning's own checks of these run when the Trainer is built, after the weights load."""
    for key in ("limit_train_batches", "limit_val_batches", "overfit_batches", "val_check_interval"):
        value = trainer.get(key)
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or value < 0 or (isinstance(value, float) and value > 1):
            raise ConfigError(f"trainer.{key} must be a fraction in [0.0, 1.0] or a number of batches "
                              f"(an integer >= 0), got {value!r}")
    if trainer.get("limit_train_batches") == 0:
        raise ConfigError("trainer.limit_train_batches=0 trains nothing; to score a model without "
                          "training use `python -m ftlab.eval`, to plan a run use dry_run=true")
    if trainer.get("val_check_interval") == 0:
        raise ConfigError("trainer.val_check_interval must be more than 0; to turn validation off "
                          "use trainer.limit_val_batches=0")
    dev = trainer.get("fast_dev_run")
    if dev is not None and not isinstance(dev, bool) and not (isinstance(dev, int) and dev >= 0):
        raise ConfigError(f"trainer.fast_dev_run must be true, false or a number of batches, got {dev!r}")
    sanity = trainer.get("num_sanity_val_steps")
    if sanity is not None and (isinstance(sanity, bool) or not isinstance(sanity, int) or sanity < -1):
        raise ConfigError(f"trainer.num_sanity_val_steps must be an integer >= -1 (-1: all), got {sanity!r}")


def build(cls, values: dict[str, Any], prefix: str, **extra):
    """``cls(**values)`` with a clear message for keys the dataclass does not have."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"{prefix}.{key} is not a known setting{did_you_mean(key, names)}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values and f.name not in extra
        and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix} is missing required setting(s): {', '.join(missing)}")
    return cls(**values, **extra)
