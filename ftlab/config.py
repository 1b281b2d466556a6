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

MODEL_SOURCES = ("gguf_package", "package", "hub", "local", "random")
MODEL_TASKS = ("causal_lm", "seq_cls")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
DATA_FORMATS = ("instruction", "chat", "text", "classification")
# Record fields each data format reads (data.fields maps them to the names in the file).
FORMAT_FIELDS = {"instruction": ("instruction", "input", "output"), "chat": ("messages",),
                 "text": ("text",), "classification": ("text", "label")}
TEMPLATES = ("alpaca",)
SCHEDULERS = ("constant", "linear", "cosine")
LOGGERS = ("csv", "tensorboard", "wandb", "none")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_find_unused_parameters_true")
SHARDED_STRATEGIES = ("fsdp", "deepspeed")
STRATEGIES = ("auto", *DDP_STRATEGIES, *SHARDED_STRATEGIES)


@dataclass
class ModelSettings:
    """Where the weights come from and what the architecture is (``conf/model/*.yaml``).

    ``tasks``: the heads this architecture offers (``causal_lm`` for decoders, ``seq_cls`` for
    a classification head over a decoder's last token or an encoder's first); ``task`` is the
    one a run trains. ``source=package``: a model directory shipped inside a Python package
    (``package``, and ``package_path`` inside it)."""

    name: str
    source: str
    task: str = "causal_lm"
    tasks: list[str] = field(default_factory=lambda: ["causal_lm", "seq_cls"])
    hub_id: str | None = None
    path: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    package: str | None = None
    package_path: str | None = None
    dtype: str = "float32"
    quantization: str = "none"
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    arch: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("model.source", self.source, MODEL_SOURCES)
        check_choice("model.task", self.task, MODEL_TASKS)
        self.tasks = [self.tasks] if isinstance(self.tasks, str) else list(self.tasks)
        for task in self.tasks:
            check_choice("model.tasks", task, MODEL_TASKS)
        if self.task not in self.tasks:
            raise ConfigError(
                f"model {self.name!r} has no {self.task} head (its heads: {', '.join(self.tasks)})"
                + ("; an encoder classifies: use data=classification (or a classification file "
                   "with data.format=classification)" if self.task == "causal_lm" else ""))
        check_choice("model.dtype", self.dtype, DTYPES)
        check_choice("model.quantization", self.quantization, QUANTIZATIONS)
        if self.source == "random" and not self.arch:
            raise ConfigError(f"model {self.name!r} has source=random but no model.arch")
        if self.source == "hub" and not (self.hub_id or self.path):
            raise ConfigError(f"model {self.name!r} needs model.hub_id or model.path")
        if self.source == "local" and not self.path:
            raise ConfigError(f"model {self.name!r} has source=local but no model.path")
        if self.source == "package" and not (self.package and self.package_path):
            raise ConfigError(f"model {self.name!r} has source=package but no model.package "
                              "and model.package_path")


@dataclass
class DataSettings:
    """Which records, how they are split, templated, tokenised and batched (``conf/data``).

    ``path``: a local file (JSON, JSON Lines, CSV, TSV, Parquet; for ``text`` also plain text),
    a directory or glob of them (``text``), ``builtin:<name>`` (shipped in ftlab), or a Hugging
    Face dataset ``hub:<owner/name>[:split]``. See docs/data.md.
    """

    name: str
    path: str
    format: str = "instruction"
    val_path: str | None = None
    val_fraction: float = 0.1
    seed: int = 0
    max_length: int = 256
    # Record field -> the name used in the file; fields not given keep their own name.
    fields: dict[str, str] = field(default_factory=dict)
    template: str = "alpaca"            # instruction: "alpaca" or a format string with {instruction}
    chat_template: str | None = None    # chat: used when the model has none ("chatml" or Jinja)
    labels: list[str] | None = None     # classification: the label set (default: the training file's)
    train_on_prompt: bool = False
    padding: str = "longest"            # "longest" (dynamic) or "max_length"
    packing: bool = False
    group_by_length: bool = False
    over_length: str = "truncate"       # "truncate" or "drop" examples longer than max_length
    cache: bool = True
    batch_size: int = 8
    eval_batch_size: int = 16
    num_workers: int = 0

    def __post_init__(self) -> None:
        check_choice("data.format", self.format, DATA_FORMATS)
        if self.template not in TEMPLATES and "{instruction}" not in str(self.template):
            raise ConfigError(f"data.template={self.template!r} is not valid; use one of "
                              f"{', '.join(TEMPLATES)} or a format string with {{instruction}} "
                              "(and optionally {input}), e.g. 'Q: {instruction} {input}\\nA: '")
        if self.val_path is None:
            check_fraction("data.val_fraction", self.val_fraction)
            if self.val_fraction == 0:
                raise ConfigError("data.val_fraction must be > 0 when no data.val_path is given")
        check_positive("data.max_length", self.max_length, integer=True)
        check_positive("data.batch_size", self.batch_size, integer=True)
        check_positive("data.eval_batch_size", self.eval_batch_size, integer=True)
        check_choice("data.padding", self.padding, ("longest", "max_length"))
        check_choice("data.over_length", self.over_length, ("truncate", "drop"))
        for key in ("train_on_prompt", "packing", "group_by_length", "cache"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"data.{key} must be true or false, got {getattr(self, key)!r}")
        known = FORMAT_FIELDS[self.format]
        for key, value in (self.fields or {}).items():
            if key not in known:
                raise ConfigError(f"data.fields.{key} is not a field of data.format={self.format}"
                                  f"{did_you_mean(key, known)}; its fields: {', '.join(known)}")
            if not isinstance(value, str) or not value:
                raise ConfigError(f"data.fields.{key} must name a record field, got {value!r}")
        self.fields = {name: (self.fields or {}).get(name, name) for name in known}
        if self.packing and self.format == "classification":
            raise ConfigError("data.packing=true packs token sequences for a language model; "
                              "data.format=classification predicts one label per example")
        if self.labels is not None:
            if not isinstance(self.labels, list) or len(self.labels) < 2:
                raise ConfigError(f"data.labels must be a list of at least two labels, got {self.labels!r}")
            self.labels = [str(v) for v in self.labels]
            if len(set(self.labels)) != len(self.labels):
                raise ConfigError(f"data.labels has duplicates: {self.labels}")


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
    """Where and how a run trains (``conf/hardware/*.yaml``); see :mod:`ftlab.hardware`.

    Checks of the values alone happen here; checks of combinations with the model and method,
    and of this machine (GPUs, bf16 support), in :func:`ftlab.hardware.check_hardware`."""

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
    holds the logits of more than one chunk (:mod:`ftlab.loss`); 0: all logits at once."""

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
    name: str = "csv"
    project: str = "ftlab"
    entity: str | None = None
    group: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    offline: bool = False

    def __post_init__(self) -> None:
        check_choice("logger", self.name, LOGGERS)


@dataclass
class EvalSettings:
    """Held-out evaluation before and after training."""

    before: bool = True
    generate: bool = True
    max_new_tokens: int = 16
    max_examples: int = 64
    show_samples: int = 4

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

    def __post_init__(self) -> None:
        _check_trainer_args(self.trainer)
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
        limit = self.trainer.get("limit_val_batches", 1.0)
        if limit in (0, 0.0):
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


def _check_trainer_args(trainer: dict[str, Any]) -> None:
    import lightning

    valid = set(inspect.signature(lightning.Trainer.__init__).parameters) - {"self"}
    owned = {"accelerator", "devices", "strategy", "precision", "num_nodes", "logger",
             "callbacks", "default_root_dir"}
    for key in trainer:
        if key in owned:
            raise ConfigError(
                f"trainer.{key} is set by ftlab (hardware.* / logger=); "
                f"use {'logger=' if key == 'logger' else 'hardware.' + key} instead"
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
    for key in ("accumulate_grad_batches", "log_every_n_steps"):
        if key in trainer and trainer[key] is not None:
            check_positive(f"trainer.{key}", trainer[key], integer=True)
    clip = trainer.get("gradient_clip_val")
    if clip is not None:
        check_positive("trainer.gradient_clip_val", clip)


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
