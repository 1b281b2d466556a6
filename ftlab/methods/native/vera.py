"""VeRA from scratch: Kopiczko, Blankevoort, Asano, "VeRA: Vector-based Random Matrix
Adaptation", arXiv 2310.11454. Selected with ``method=vera method.backend=native``.

Each adapted layer ``h = W0 x`` becomes

    h = W0 x + diag(b) B diag(d) A dropout(x)

with A (r x in) and B (out x r) frozen random matrices, shared by all adapted layers, and two
trainable vectors per layer: b (out, init 0, so the model is unchanged at step 0) and d (r,
init ``d_initial`` = 0.1). Trainable parameters: ``sum over adapted layers of (out + r)``.

One pair of shared matrices is drawn, sized for the largest input and output width among the
adapted layers (A: r x max_in, B: max_out x r); a layer uses the top-left slice
``A[:, :in]``, ``B[:out, :]``, as peft does. Both come from ``torch.Generator`` seeded with
``projection_prng_key``: A first, then B, each Kaiming-uniform with gain sqrt(2)
(bound = sqrt(6 / fan_in)), the same draw as peft's, so a key regenerates them. They are
buffers (no gradient, no optimizer state), held once by :class:`VeraProjections` and
referenced from every layer; non-persistent, so the model's state dict does not repeat them
per layer. Merges exactly: ``W = W0 + diag(b) B diag(d) A``.

Saved in peft's VeRA format (``vera_lambda_b``/``vera_lambda_d`` per layer, plus
``base_model.vera_A``/``base_model.vera_B`` when ``save_projection``), which
``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ftlab.errors import ConfigError, check_fraction, check_positive
from ftlab.methods.base import PlainHooks, Traits, freeze
from ftlab.methods.native.common import (
    PEFT_PREFIX,
    MergeableDelta,
    adapter_dtype,
    conv1d_type,
    find_targets,
    head_tensors,
    in_out_features,
    load_named,
    peft_target_modules,
    peft_task,
    read_peft_format,
    replace_layers,
    save_peft_format,
    train_heads,
    wrappers,
)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-bound, bound), bound = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections_from_key(key: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared ``(A, B)`` for ``projection_prng_key=key`` (drawn on the CPU, in float32)."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    a = kaiming_uniform((r, max_in), generator)
    b = kaiming_uniform((max_out, r), generator)
    return a, b


class VeraProjections(nn.Module):
    """The frozen shared pair: ``vera_A`` (r x max_in) and ``vera_B`` (max_out x r)."""

    def __init__(self, vera_A: torch.Tensor, vera_B: torch.Tensor):
        super().__init__()
        self.register_buffer("vera_A", vera_A, persistent=False)
        self.register_buffer("vera_B", vera_B, persistent=False)


class VeraLinear(MergeableDelta, nn.Module):
    """``base_layer(x) + b * (B_s (d * (A_s dropout(x))))`` with A_s, B_s the slices of the
    shared projections that fit this layer."""

    def __init__(self, base_layer: nn.Module, projections: VeraProjections, r: int,
                 d_initial: float = 0.1, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, conv1d_type())
        self.in_features, self.out_features = in_out_features(base_layer)
        self.r = r
        # A shared submodule: every layer sees the same buffers, moved once by .to().
        self.vera_projections = projections
        kw = {"device": base_layer.weight.device, "dtype": adapter_dtype(base_layer.weight)}
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **kw))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), **kw))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def _sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.vera_projections
        dtype = self.vera_lambda_b.dtype
        return p.vera_A[: self.r, : self.in_features].to(dtype), p.vera_B[: self.out_features, : self.r].to(dtype)

    def get_delta_weight(self) -> torch.Tensor:
        """``diag(b) B diag(d) A`` in the base weight's layout."""
        a, b = self._sliced()
        delta = (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        a, b = self._sliced()
        x = self.vera_dropout(x.to(a.dtype))
        branch = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, a), b)
        return result + branch.to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, in={self.in_features}, out={self.out_features}"


def vera_layers(model: nn.Module) -> dict[str, VeraLinear]:
    return wrappers(model, VeraLinear)


@dataclass
class NativeVera(PlainHooks):
    """VeRA with ftlab's own layers (see the module docstring)."""

    traits = Traits(size_knob="r")

    r: int = 256
    d_initial: float = 0.1
    projection_prng_key: int = 0
    dropout: float = 0.0
    target_modules: Any = ("q_proj", "v_proj")
    save_projection: bool = True
    name: str = "vera"

    def check(self, model: nn.Module) -> None:
        find_targets(model, self.target_modules)

    def apply(self, model: nn.Module, total_steps: int = 0,
              projections: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
        """Inject VeRA layers; ``projections`` (A, B) replaces the draw from the key (loading)."""
        names = find_targets(model, self.target_modules)
        sizes = [in_out_features(model.get_submodule(n)) for n in names]
        max_in, max_out = max(s[0] for s in sizes), max(s[1] for s in sizes)
        a, b = projections or projections_from_key(self.projection_prng_key, self.r, max_in, max_out)
        if a.shape[0] < self.r or a.shape[1] < max_in or b.shape[0] < max_out or b.shape[1] < self.r:
            raise ValueError(f"VeRA projections of shapes {tuple(a.shape)}, {tuple(b.shape)} cannot "
                             f"serve r={self.r}, in={max_in}, out={max_out}")
        device = model.get_submodule(names[0]).weight.device
        shared = VeraProjections(a.to(device), b.to(device))
        freeze(model)
        replace_layers(model, names, lambda _, layer: VeraLinear(
            layer, shared, self.r, self.d_initial, self.dropout))
        train_heads(model)
        return model

    def save(self, model: nn.Module, directory: Path) -> None:
        """peft's VeRA format; the shared A, B are included when ``save_projection``."""
        from peft import VeraConfig

        layers = vera_layers(model)
        tensors = {}
        for name, layer in layers.items():
            tensors[f"{PEFT_PREFIX}{name}.vera_lambda_b"] = layer.vera_lambda_b
            tensors[f"{PEFT_PREFIX}{name}.vera_lambda_d"] = layer.vera_lambda_d
        if self.save_projection:
            shared = next(iter(layers.values())).vera_projections
            tensors["base_model.vera_A"] = shared.vera_A
            tensors["base_model.vera_B"] = shared.vera_B
        config = VeraConfig(
            r=self.r, d_initial=self.d_initial, projection_prng_key=self.projection_prng_key,
            save_projection=self.save_projection, vera_dropout=self.dropout,
            target_modules=peft_target_modules(model, list(layers)),
            fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers.values()),
            **peft_task(model))
        save_peft_format(Path(directory), config, {**tensors, **head_tensors(model)})

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        """Rebuild the VeRA layers a saved peft adapter describes and fill b and d; A and B
        come from the file when it holds them, else from ``projection_prng_key``."""
        config, tensors, _ = read_peft_format(Path(directory), "VERA")
        method = dataclasses.replace(
            self, r=config["r"], d_initial=config.get("d_initial", 0.1),
            projection_prng_key=config["projection_prng_key"], dropout=config.get("vera_dropout", 0.0),
            save_projection=config.get("save_projection", True), target_modules=config["target_modules"])
        a, b = tensors.pop("base_model.vera_A", None), tensors.pop("base_model.vera_B", None)
        method.apply(model, projections=(a, b) if a is not None and b is not None else None)
        load_named(model, tensors, ".vera_lambda_", directory)
        return model


def build_native_vera(r: int = 256, d_initial: float = 0.1, projection_prng_key: int = 0,
                      dropout: float = 0.0, target_modules: Any = ("q_proj", "v_proj"),
                      save_projection: bool = True) -> NativeVera:
    """The ``method.backend=native`` branch of the ``vera`` builder (its flat keys but
    ``backend``); checks its own ranges too, for callers that come here directly."""
    check_positive("method.r", r, integer=True)
    check_fraction("method.dropout", dropout)
    if isinstance(d_initial, bool) or not isinstance(d_initial, (int, float)):
        raise ConfigError(f"method.d_initial must be a number, got {d_initial!r}")
    if isinstance(projection_prng_key, bool) or not isinstance(projection_prng_key, int):
        raise ConfigError(f"method.projection_prng_key must be an integer, got {projection_prng_key!r}")
    return NativeVera(r=r, d_initial=float(d_initial), projection_prng_key=projection_prng_key,
                      dropout=dropout, target_modules=target_modules, save_projection=bool(save_projection))
