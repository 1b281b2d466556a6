"""Bottleneck adapters: Houlsby et al., "Parameter-Efficient Transfer Learning for NLP",
arXiv 1902.00751.

An adapter is a small residual bottleneck applied to the output h (width d) of a sublayer:

    adapter(h) = h + W_up f(W_down h + b_down) + b_up

W_down (m x d) projects to the bottleneck m << d, f is a nonlinearity, W_up (d x m) projects
back. Houlsby et al. insert two per transformer layer: after the attention output projection
and after the feed-forward sublayer, before each residual sum and layer norm. ftlab wraps
those projection layers, so the adapter sees exactly the sublayer's output:

    Llama / Mistral / Qwen:  self_attn.o_proj, mlp.down_proj
    GPT-2:                   attn.c_proj, mlp.c_proj
    BERT / RoBERTa:          attention.output.dense, output.dense
    Falcon:                  self_attention.dense, mlp.dense_4h_to_h

(``method.target_modules=auto`` picks these; a list of module names overrides.) Each adapter
has ``d*m + m + m*d + d`` parameters, so a model with L layers trains
``2 L (2 d m + m + d)``; everything else stays frozen. (The paper also trains the layer-norm
parameters; ftlab keeps them frozen so that only the adapters differ from the base.)

Near-identity start, as in the paper: all adapter weights are drawn from a zero-mean normal
with standard deviation ``init_scale`` (truncated at two deviations; the paper found quality
stable for scales up to about 1e-2), biases are 0, so at step 0 each adapter adds a term of order
``init_scale^2`` and the model is almost unchanged.

No merging: f sits between the two projections, so the adapter is not a linear map and
cannot be folded into the base weights; it costs extra latency at inference. peft has no
bottleneck adapter, so :meth:`BottleneckAdapters.save` writes ``bottleneck_adapter.safetensors``
(the adapter tensors under their module paths) and ``bottleneck_adapter.json`` (the settings),
which :meth:`BottleneckAdapters.load` reads back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftlab.errors import ConfigError, check_choice, check_positive
from ftlab.methods.base import PlainHooks, Traits, freeze
from ftlab.methods.native.common import (
    adapter_dtype,
    classification_heads,
    find_targets,
    in_out_features,
    load_named,
    replace_layers,
    train_heads,
    wrappers,
)
from ftlab.methods.registry import register

NONLINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
CONFIG_FILE, WEIGHTS_FILE = "bottleneck_adapter.json", "bottleneck_adapter.safetensors"
# Sublayer output projections per architecture, in the order attention, feed-forward.
AUTO_TARGETS = (("o_proj", "down_proj"), ("attn.c_proj", "mlp.c_proj"), ("attention.output.dense", "output.dense"),
                ("self_attention.dense", "mlp.dense_4h_to_h"))


class BottleneckAdapter(nn.Module):
    """``h = base_layer(x); return h + adapter_up(f(adapter_down(h)))``."""

    def __init__(self, base_layer: nn.Module, bottleneck: int, nonlinearity: str = "gelu",
                 init_scale: float = 1e-3):
        super().__init__()
        self.base_layer = base_layer
        d = in_out_features(base_layer)[1]
        kw = {"device": base_layer.weight.device, "dtype": adapter_dtype(base_layer.weight)}
        self.adapter_down = nn.Linear(d, bottleneck, **kw)
        self.adapter_act = NONLINEARITIES[nonlinearity]()
        self.adapter_up = nn.Linear(bottleneck, d, **kw)
        with torch.no_grad():
            for linear in (self.adapter_down, self.adapter_up):
                nn.init.trunc_normal_(linear.weight, std=init_scale, a=-2 * init_scale, b=2 * init_scale)
                nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        z = h.to(self.adapter_down.weight.dtype)
        return h + self.adapter_up(self.adapter_act(self.adapter_down(z))).to(h.dtype)


def auto_targets(model: nn.Module) -> list[str]:
    """The attention and feed-forward output projections of a known architecture."""
    names = [n for n, _ in model.named_modules()]
    for attn, ffn in AUTO_TARGETS:
        if any(n.endswith("." + attn) for n in names) and any(n.endswith("." + ffn) for n in names):
            return [attn, ffn]
    raise ConfigError("method.target_modules=auto knows Llama-style (o_proj, down_proj), GPT-2 "
                      "(attn.c_proj, mlp.c_proj), BERT (attention.output.dense, output.dense) and "
                      "Falcon (self_attention.dense, mlp.dense_4h_to_h) layers; name this model's "
                      "sublayer output projections in method.target_modules")


@dataclass
class BottleneckAdapters(PlainHooks):
    """Houlsby adapters after the attention and feed-forward sublayers (module docstring)."""

    bottleneck: int = 64
    nonlinearity: str = "gelu"
    init_scale: float = 1e-3
    target_modules: Any = "auto"
    name: str = "adapter"
    traits = Traits(artifact_format="own", mergeable=False, changes_model_at_init=True, size_knob="bottleneck",
                    merge_note="a bottleneck adapter has a nonlinearity between its two projections, "
                               "so it is not a change of any weight matrix. Export the adapter instead "
                               "(--adapter OUT; ftlab's own format, loaded by ftlab.eval)")

    def _targets(self, model: nn.Module):
        return auto_targets(model) if self.target_modules == "auto" else self.target_modules

    def check(self, model: nn.Module) -> None:
        find_targets(model, self._targets(model))

    def apply(self, model: nn.Module, total_steps: int = 0) -> nn.Module:
        names = find_targets(model, self._targets(model))
        freeze(model)
        replace_layers(model, names, lambda _, layer: BottleneckAdapter(
            layer, self.bottleneck, self.nonlinearity, self.init_scale))
        train_heads(model)
        return model

    def save(self, model: nn.Module, directory: Path) -> None:
        """``bottleneck_adapter.safetensors`` (adapter tensors by module path) and
        ``bottleneck_adapter.json`` (settings and the wrapped layers)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        layers = wrappers(model, BottleneckAdapter)
        heads = tuple(f"{h}." for h in classification_heads(model))  # a classifier's new head
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                   if ".adapter_" in n or n.startswith(heads)}
        settings = {"method": self.name, "paper": "arXiv 1902.00751", "bottleneck": self.bottleneck,
                    "nonlinearity": self.nonlinearity, "init_scale": self.init_scale,
                    "target_modules": sorted(layers)}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        (directory / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        """Wrap the layers named in the saved settings and fill the adapters."""
        from safetensors.torch import load_file

        directory = Path(directory)
        settings = json.loads((directory / CONFIG_FILE).read_text())
        self.bottleneck, self.nonlinearity = settings["bottleneck"], settings["nonlinearity"]
        self.init_scale, self.target_modules = settings["init_scale"], settings["target_modules"]
        self.apply(model)
        load_named(model, load_file(str(directory / WEIGHTS_FILE)), ".adapter_", directory)
        return model


@register("adapter")
def adapter(bottleneck: int = 64, nonlinearity: str = "gelu", init_scale: float = 1e-3,
            target_modules: list[str] | str = "auto") -> BottleneckAdapters:
    """Houlsby bottleneck adapters (arXiv 1902.00751)."""
    check_positive("method.bottleneck", bottleneck, integer=True)
    check_choice("method.nonlinearity", nonlinearity, NONLINEARITIES)
    check_positive("method.init_scale", init_scale)
    if target_modules != "auto":
        from ftlab.methods.checks import check_targets

        target_modules = check_targets(target_modules)
    return BottleneckAdapters(bottleneck=bottleneck, nonlinearity=nonlinearity, init_scale=float(init_scale),
                              target_modules=target_modules)
