"""What the native methods share: finding target layers, swapping them for wrappers, and
reading and writing peft's adapter format.

Native adapter layers wrap the layer they adapt (``<path>.base_layer``) and keep their own
tensors under a method prefix (``lora_``, ``vera_``, ``adapter_``), so freezing, counting and
saving are name filters. A native model is the transformers model itself (no ``PeftModel``
around it), so a parameter ``model.layers.0.self_attn.q_proj.lora_A.weight`` is saved under
peft's key ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ftlab.errors import ConfigError

PEFT_PREFIX = "base_model.model."  # what PeftModel + its tuner put in front of a module path
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


class MergeableDelta:
    """``merge`` / ``unmerge`` of an adapter layer whose update is a weight delta: ``W <- W + dW``
    and back, in place, where ``dW = get_delta_weight()`` is in the base weight's layout. While
    merged, the layer's forward returns the base layer's output alone."""

    merged: bool
    base_layer: nn.Module

    def get_delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def merge(self) -> None:
        if not self.merged:
            with torch.no_grad():
                self.base_layer.weight += self.get_delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            with torch.no_grad():
                self.base_layer.weight -= self.get_delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False


def conv1d_type():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of an ``nn.Linear`` or of GPT-2's ``Conv1D``, whose weight is stored
    transposed, ``(in, out)`` (fan_in_fan_out)."""
    if isinstance(layer, conv1d_type()):
        n_in, n_out = layer.weight.shape
        return int(n_in), int(n_out)
    return layer.in_features, layer.out_features


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapter tensors stay in float32 over a half-precision base, as peft does by default
    (``autocast_adapter_dtype=True``): tiny updates to bf16 values would round away."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def matches(module_name: str, targets: list[str]) -> bool:
    """peft's rule: a target is the full module path or a suffix of it after a dot."""
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def resolve_targets(model: nn.Module, target_modules) -> list[str]:
    """Target names as a list; ``all-linear`` means :func:`all_linear_paths`."""
    if target_modules == "all-linear":
        return all_linear_paths(model)
    return [target_modules] if isinstance(target_modules, str) else list(target_modules)


def all_linear_paths(model: nn.Module) -> list[str]:
    """Full paths of the layers ``all-linear`` selects, by peft's rule: every ``nn.Linear`` and
    ``Conv1D`` but the model's output layer (``get_output_embeddings()``, the LM head) and
    anything inside a sequence classifier's new head, which trains whole. Full paths, not leaf
    names: a head's ``dense`` (RoBERTa's ``classifier.dense``) shares its leaf with the encoder's."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    heads = tuple(classification_heads(model))
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, conv1d_type())) and m is not output
            and not any(name == h or name.startswith(h + ".") for h in heads)]


# nn.Linear subclasses that only restate its forward (x @ W.T + b with their own weight and
# bias): Falcon's FalconLinear (transformers.models.falcon), every linear layer of Falcon.
PLAIN_LINEAR_SUBCLASSES = (("transformers.models.falcon.modeling_falcon", "FalconLinear"),)


def _plain_linear_subclass(module: nn.Module) -> bool:
    cls = type(module)
    return isinstance(module, nn.Linear) and (cls.__module__, cls.__name__) in PLAIN_LINEAR_SUBCLASSES


def find_targets(model: nn.Module, target_modules, *, key: str = "method.target_modules") -> list[str]:
    """Paths of the linear layers (``nn.Linear`` or ``Conv1D``) the targets select.

    Raises :class:`ConfigError` when nothing matches, or when a match is a layer type the
    native methods cannot wrap (a quantized layer, an embedding, a whole block)."""
    from ftlab.methods.targets import linear_module_names

    targets = resolve_targets(model, target_modules)
    kinds = (nn.Linear, conv1d_type())
    found, unsupported = [], []
    for name, module in model.named_modules():
        if not name or not matches(name, targets):
            continue
        # Exact types: a wrapper is not wrapped twice, a quantized nn.Linear subclass is refused.
        if type(module) in kinds or _plain_linear_subclass(module):
            found.append(name)
        elif not _is_native_wrapper(module):
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise ConfigError(
            f"{key}={_fmt(targets)} selects layers a native method cannot wrap: "
            f"{', '.join(unsupported[:4])}; native methods adapt nn.Linear (and Falcon's FalconLinear) "
            "and Conv1D layers only"
        )
    if not found:
        raise ConfigError(
            f"{key}={_fmt(targets)} matches no module of this model; "
            f"its linear layers are: {', '.join(linear_module_names(model))}"
        )
    return found


# The new head of a sequence-classification model: peft's SEQ_CLS ``modules_to_save``. It starts
# random, so every method trains it along with its adapter (as peft's methods do) and saves it
# with the adapter, under peft's keys (``base_model.model.classifier.weight``).
CLASSIFICATION_HEADS = ("classifier", "score")


def classification_heads(model: nn.Module) -> list[str]:
    """Names of the classification head modules of a ``*ForSequenceClassification`` model."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return []
    return [n for n in CLASSIFICATION_HEADS if isinstance(getattr(model, n, None), nn.Module)]


def train_heads(model: nn.Module) -> None:
    for name in classification_heads(model):
        getattr(model, name).requires_grad_(True)


def head_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The classification head's parameters under peft's keys (empty for a language model)."""
    return {f"{PEFT_PREFIX}{name}.{key}": p for name in classification_heads(model)
            for key, p in getattr(model, name).named_parameters()}


def peft_task(model: nn.Module) -> dict:
    """``task_type`` (and ``modules_to_save``) of a peft config that describes ``model``'s adapter."""
    heads = classification_heads(model)
    return {"task_type": "SEQ_CLS", "modules_to_save": heads} if heads else {"task_type": "CAUSAL_LM"}


def _is_native_wrapper(module: nn.Module) -> bool:
    return isinstance(getattr(module, "base_layer", None), nn.Module)


def _fmt(targets: list[str]) -> str:
    return "[" + ",".join(targets) + "]"


def replace_layers(model: nn.Module, names: list[str], wrap: Callable[[str, nn.Module], nn.Module]) -> dict:
    """Replace each named layer by ``wrap(name, layer)``; returns ``{name: wrapper}``."""
    wrapped = {}
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped[name] = wrap(name, getattr(parent, leaf))
        setattr(parent, leaf, wrapped[name])
    return wrapped


def wrappers(model: nn.Module, cls: type) -> dict[str, nn.Module]:
    """``{path: layer}`` of the wrappers of type ``cls`` in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}


def peft_target_modules(model: nn.Module, wrapped: list[str]) -> list[str]:
    """``target_modules`` for a saved adapter_config.json that selects exactly the wrapped
    layers: their leaf names when these select nothing else, else the full paths."""
    leaves = sorted({n.rpartition(".")[2] for n in wrapped})
    others = [n for n, _ in model.named_modules() if n not in wrapped and matches(n, leaves)]
    return leaves if not others else sorted(wrapped)


# -- peft's adapter format -------------------------------------------------------------------
def save_peft_format(directory: Path, peft_config, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    """Write ``adapter_config.json`` (through peft's own config class) and
    ``adapter_model.safetensors`` with ``tensors`` keyed as peft keys them."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_config.save_pretrained(str(directory))
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(cpu, str(directory / WEIGHTS_FILE), metadata={"format": "pt", **(metadata or {})})


def read_peft_format(directory: Path, peft_type: str) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """``(config, tensors, safetensors metadata)`` of an adapter directory of ``peft_type``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{directory} holds no peft adapter ({CONFIG_FILE} + {WEIGHTS_FILE})")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != peft_type:
        raise ValueError(f"{directory} holds a {config.get('peft_type')} adapter, not {peft_type}")
    with safe_open(str(weights_path), framework="pt") as fh:
        metadata = fh.metadata() or {}
    return config, load_file(str(weights_path)), metadata


def load_named(model: nn.Module, tensors: dict[str, torch.Tensor], marker: str | None, directory) -> None:
    """Copy ``tensors`` (keys ``<module path>.<name>``, with or without peft's prefix) into
    the model's parameters of the same names; every parameter whose name holds ``marker``
    (``.lora_``) must be filled (``None``: no such requirement)."""
    own = dict(model.named_parameters())
    expected = {n for n in own if marker is not None and marker in n}
    got = {}
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name not in own:
            raise ValueError(f"{directory}: tensor {key!r} has no place in this model")
        got[name] = value
    missing = sorted(expected - set(got))
    if missing:
        raise ValueError(f"{directory}: no tensor for {missing[0]} (and {len(missing) - 1} more)")
    with torch.no_grad():
        for name, value in got.items():
            if own[name].shape != value.shape:
                raise ValueError(f"{directory}: {name} has shape {tuple(value.shape)}, "
                                 f"the model expects {tuple(own[name].shape)}")
            own[name].copy_(value)
