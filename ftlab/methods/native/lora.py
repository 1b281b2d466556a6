"""LoRA from scratch: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv 2106.09685. Selected with ``method=lora method.backend=native``.

A frozen linear layer ``h = W0 x`` (W0: out x in) gets a trainable low-rank branch

    h = W0 x + s * B A dropout(x),      s = alpha / r   (rsLoRA: alpha / sqrt(r))

with A (r x in) drawn Kaiming-uniform (a = sqrt(5), the default of ``nn.Linear`` and of peft
and loralib) and B (out x r) = 0, so the model is unchanged at step 0. Only A and B train:
``sum over adapted layers of r * (in + out)`` parameters. The update merges exactly:
``W = W0 + s B A`` (transposed for GPT-2's ``Conv1D``, whose weight is stored in x out).

Same tensors and names as peft's LoRA (``<path>.lora_A.weight``, ``<path>.lora_B.weight``),
so :meth:`NativeLora.save` writes peft's adapter format and ``PeftModel.from_pretrained``
loads it. LoRA-FA and Delta-LoRA reuse :class:`LoraLinear`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftlab.errors import ConfigError
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


class LoraLinear(MergeableDelta, nn.Module):
    """``base_layer(x) + s * lora_B(lora_A(lora_dropout(x)))`` around an ``nn.Linear`` or
    ``Conv1D``; ``merge()`` folds ``s B A`` into the base weight, ``unmerge()`` takes it out."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, conv1d_type())
        self.in_features, self.out_features = in_out_features(base_layer)
        self.r = r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        weight = base_layer.weight
        kw = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def get_delta_weight(self) -> torch.Tensor:
        """``s B A`` in the base weight's layout (out x in; in x out for ``Conv1D``)."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        x = x.to(self.lora_A.weight.dtype)
        # When A is frozen (LoRA-FA), autograd keeps only A x (r wide) for B's gradient and
        # never the input x: a matmul saves its input only if its weight needs a gradient.
        branch = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        return result + branch.to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, fan_in_fan_out={self.fan_in_fan_out}"


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return wrappers(model, LoraLinear)


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """A and B of every LoRA layer under peft's keys (``base_model.model.<path>.lora_A.weight``)."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    return out


def peft_lora_config(model: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool):
    """The peft ``LoraConfig`` that rebuilds exactly the LoRA layers of ``model``."""
    from peft import LoraConfig

    layers = lora_layers(model)
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
        target_modules=peft_target_modules(model, list(layers)),
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers.values()),
        # The name ftlab's loader gave the base (a hub id, not a private cache path), as peft reads it.
        base_model_name_or_path=(getattr(model, "name_or_path", None)
                                 or getattr(getattr(model, "config", None), "_name_or_path", None) or None),
        **peft_task(model),
    )


@dataclass
class NativeLora(PlainHooks):
    """LoRA with ftlab's own layers (see the module docstring).

    ``train_A=False`` freezes A after injection (what LoRA-FA builds on)."""

    traits = Traits(size_knob="r")

    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: Any = ("q_proj", "v_proj")
    use_rslora: bool = False
    train_A: bool = True
    name: str = "lora"

    def check(self, model: nn.Module) -> None:
        find_targets(model, self.target_modules)

    def apply(self, model: nn.Module, total_steps: int = 0) -> nn.Module:
        names = find_targets(model, self.target_modules)
        freeze(model)
        replace_layers(model, names, lambda _, layer: LoraLinear(
            layer, self.r, self.alpha, self.dropout, self.use_rslora))
        train_heads(model)
        if not self.train_A:
            for layer in lora_layers(model).values():
                layer.lora_A.weight.requires_grad_(False)
        return model

    def save(self, model: nn.Module, directory: Path) -> None:
        """peft's LoRA adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``."""
        config = peft_lora_config(model, self.r, self.alpha, self.dropout, self.use_rslora)
        save_peft_format(Path(directory), config, {**lora_tensors(model), **head_tensors(model)})

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        """Rebuild the layers a saved peft LoRA adapter describes on ``model`` and fill them."""
        config, tensors, _ = read_peft_format(Path(directory), "LORA")
        unsupported = [k for k in ("use_dora", "lora_bias") if config.get(k)]
        if config.get("bias", "none") != "none" or unsupported:
            raise ValueError(f"{directory}: native LoRA reads plain LoRA adapters only "
                             f"(bias='none', no {', '.join(unsupported) or 'extras'})")
        method = dataclasses.replace(
            self, r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
            use_rslora=bool(config.get("use_rslora")), target_modules=config["target_modules"])
        method.apply(model)
        load_named(model, tensors, ".lora_", directory)
        return model


def build_native_lora(r: int = 8, alpha: float = 16, dropout: float = 0.0,
                      target_modules: Any = ("q_proj", "v_proj"), use_rslora: bool = False,
                      bias: str = "none") -> NativeLora:
    """The ``method.backend=native`` branch of the ``lora`` builder (ranges already checked)."""
    if bias != "none":
        raise ConfigError(f"method.bias={bias!r} is not supported by method.backend=native; "
                          "use method.bias=none or method.backend=peft")
    return NativeLora(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                      use_rslora=bool(use_rslora))
