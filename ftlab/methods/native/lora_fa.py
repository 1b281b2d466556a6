"""LoRA-FA: Zhang et al., "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language
Models Fine-tuning", arXiv 2308.03303. FA = *frozen A*.

The layer is LoRA's, ``h = W0 x + s B A x`` (s = alpha / r), with A (r x in) drawn at random
(Kaiming-uniform, as LoRA) and then FROZEN; only B (out x r, init 0) trains:
``sum over adapted layers of r * out`` parameters.

Why it saves memory. The gradients of the branch ``y = B z, z = A x`` are

    dL/dB = s * g z^T         (needs z = A x: r numbers per token)
    dL/dA = s * (B^T g) x^T   (needs x: in numbers per token)
    dL/dx = s * A^T B^T g     (needs A and B, which are weights, not activations)

With A frozen, dL/dA is never formed, so the input x need not be kept for the backward pass:
only the r-wide ``A x`` is. PyTorch's autograd already works this way (a matmul saves its
input only when its weight requires a gradient), so :class:`~.lora.LoraLinear` with a frozen
``lora_A`` stores ``A x`` and not ``x``; ``tests/methods/test_native_lora_fa.py`` measures
it with ``saved_tensors_hooks``. (Computing ``A x`` under ``no_grad`` would be wrong: the
gradient must still reach x through ``A^T B^T g``.) Dropout on x would bring back an
x-sized mask, so this method's default is ``dropout=0``. The paper reports up to 1.4x less
total memory than LoRA.

Two variants, chosen with ``method.variant``:

- ``paper`` (default): the above with the optimizer from config (AdamW) over B.
- ``peft_optimizer``: peft's ``LoraFAOptimizer`` (``peft.optimizers.create_lorafa_optimizer``),
  an AdamW whose gradient for B is first projected, ``g_B' = (1 / s^2) g_B (A A^T)^-1``, the
  least-squares best low-rank step. It is its own optimizer class, so the method supplies it
  through the optional ``build_optimizer`` hook and ``optimizer.*`` settings other than lr and
  weight_decay do not apply (its betas are (0.9, 0.999), eps 1e-6).

Saved in peft's LoRA format (A and B): a LoRA-FA adapter loads in plain peft as a LoRA adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftlab.errors import check_choice
from ftlab.methods.base import PlainHooks, Traits
from ftlab.methods.native.lora import NativeLora, lora_layers
from ftlab.methods.checks import check_low_rank, check_targets
from ftlab.methods.registry import register

VARIANTS = ("paper", "peft_optimizer")


@dataclass
class LoraFA(PlainHooks):
    """LoRA with A frozen after its random init; B alone trains (module docstring)."""

    traits = Traits(size_knob="r")

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: Any = ("q_proj", "v_proj")
    variant: str = "paper"
    name: str = "lora_fa"

    def _lora(self) -> NativeLora:
        return NativeLora(r=self.r, alpha=self.alpha, dropout=self.dropout,
                          target_modules=self.target_modules, train_A=False, name=self.name)

    def check(self, model: nn.Module) -> None:
        self._lora().check(model)

    def apply(self, model: nn.Module, total_steps: int = 0) -> nn.Module:
        return self._lora().apply(model)

    def build_optimizer(self, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer | None:
        """peft's ``LoraFAOptimizer`` for ``variant=peft_optimizer``; None (the configured
        optimizer over :meth:`param_groups`) for ``variant=paper``.

        Builds the one group ``create_lorafa_optimizer`` builds, over ftlab's own layers:
        each layer's (A, B) adjacent and in that order, with their names and scalings."""
        if self.variant == "paper":
            return None
        from peft.optimizers.lorafa import LoraFAOptimizer

        params, names, scalings = [], [], []
        for name, layer in lora_layers(model).items():
            for part in ("lora_A", "lora_B"):
                params.append(getattr(layer, part).weight)
                names.append(f"{name}.{part}.weight")
                scalings.append(layer.scaling)
        others = [(n, p) for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
        for n, p in others:
            params.append(p)
            names.append(n)
            scalings.append(None)
        group = {"params": params, "names": names, "scaling_factors": scalings, "lr": lr,
                 "betas": (0.9, 0.999), "weight_decay": weight_decay}
        return LoraFAOptimizer([group])

    def save(self, model: nn.Module, directory: Path) -> None:
        """peft's LoRA format: ``PeftModel.from_pretrained`` reads it as a LoRA adapter."""
        self._lora().save(model, directory)

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        model = self._lora().load(model, directory)
        for layer in lora_layers(model).values():
            layer.lora_A.weight.requires_grad_(False)
        return model


@register("lora_fa")
def lora_fa(r: int = 8, alpha: float = 16, dropout: float = 0.0,
            target_modules: list[str] | str = ("q_proj", "v_proj"), variant: str = "paper") -> LoraFA:
    """LoRA-FA (arXiv 2308.03303): LoRA with A frozen, B trained."""
    check_low_rank(r, alpha, dropout)
    check_choice("method.variant", variant, VARIANTS)
    return LoraFA(r=r, alpha=alpha, dropout=dropout, target_modules=check_targets(target_modules),
                  variant=variant)
