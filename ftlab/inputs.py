"""Typed settings of a run's inputs: the model (``conf/model``) and the data (``conf/data``).

Part of :mod:`ftlab.config` (which re-exports them); each dataclass checks its values in
``__post_init__``, where they are defined.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ftlab.errors import ConfigError, check_choice, check_fraction, check_positive, did_you_mean

MODEL_SOURCES = ("gguf_package", "package", "hub", "local", "random")
MODEL_TASKS = ("causal_lm", "seq_cls")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
DATA_FORMATS = ("instruction", "chat", "sharegpt", "text", "classification")
# Record fields each data format reads (data.fields maps them to the names in the file).
FORMAT_FIELDS = {"instruction": ("instruction", "input", "output"), "chat": ("messages",),
                 "sharegpt": ("conversations",),
                 "text": ("text",), "classification": ("text", "label")}
TEMPLATES = ("alpaca", "chat")   # chat: the model's own chat template (docs/data.md)


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
    Face dataset ``hub:<owner/name>[:split]`` (``subset``: its config name). See docs/data.md.

    ``test_path`` / ``test_fraction``: the held-out test split (one or the other; docs/data.md).
    """

    name: str
    path: str
    format: str = "instruction"
    val_path: str | None = None
    val_fraction: float = 0.1
    # The held-out test split, scored once after training and never used to select a
    # checkpoint or learning rate: a file in the training data's format, or a fraction of the
    # training records carved with ``seed`` (off when neither is given).
    test_path: str | None = None
    test_fraction: float = 0.0
    seed: int = 0
    max_length: int = 256
    # Record field -> the name used in the file; fields not given keep their own name.
    fields: dict[str, str] = field(default_factory=dict)
    template: str = "alpaca"            # instruction: "alpaca", "chat" or a format string with {instruction}
    chat_template: str | None = None    # chat: used when the model has none ("chatml" or Jinja)
    subset: str | None = None           # hub datasets: the config (subset) name, e.g. "main"
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
        self._check_test()
        if self.subset is not None and (not isinstance(self.subset, str) or not self.subset.strip()):
            raise ConfigError(f"data.subset must name a dataset config (subset) of a hub dataset, "
                              f"got {self.subset!r}")
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

    def _check_test(self) -> None:
        fraction = self.test_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise ConfigError(f"data.test_fraction must be a fraction in [0, 1) of the training records "
                              f"(0: no test split), got {fraction!r}")
        if self.test_path is not None and (not isinstance(self.test_path, str) or not self.test_path.strip()):
            raise ConfigError(f"data.test_path must name a file, got {self.test_path!r}")
        if self.test_path and fraction:
            raise ConfigError(f"give data.test_path={self.test_path} or data.test_fraction={fraction}, "
                              "not both")
        if self.test_path and self.test_path in (self.path, self.val_path):
            raise ConfigError(f"data.test_path={self.test_path} is also the "
                              f"{'training' if self.test_path == self.path else 'validation'} data; "
                              "a test split must be held out from both")
        if fraction and self.val_path is None and fraction + self.val_fraction >= 1:
            raise ConfigError(f"data.test_fraction={fraction} + data.val_fraction={self.val_fraction} "
                              "leaves no training records; lower one of them")
