"""The interface every fine-tuning method implements, and helpers they share.

A method is a small object, built by a registered builder from flat keyword arguments
(``conf/method/<name>.yaml``). The rest of ftlab only ever talks to this interface: what it
needs to know about a method is in :class:`Traits`, what it asks a method to do is in
:class:`Method`. No code outside ``ftlab/methods/`` tests a method's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class Traits:
    """What the run, evaluation, export and the planner need to know about a method.

    - ``artifact``: the directory :meth:`Method.save` writes in a run (``adapter`` or ``model``);
    - ``artifact_format``: ``peft`` (plain peft loads it), ``model`` (a transformers model
      directory) or ``own`` (ftlab's own format, loaded by :meth:`Method.load`);
    - ``mergeable``: whether export can fold what was trained into the base weights;
      ``merge_note``: what export says when it merges (or, if not mergeable, why not);
    - ``packing``: whether packed batches (several examples per row, kept apart by position
      ids) train correctly with it (peft's prompt methods drop the position ids);
    - ``quantized_base``: whether it trains over a bitsandbytes 4/8-bit base;
      ``base_quantization``: a quantization it needs for its base (QLoRA: ``nf4``);
    - ``gradient_checkpointing``: whether it turns on activation recomputation itself;
    - ``changes_model_at_init``: whether applying it changes the model's outputs before any
      step (prompt methods, a quantized base) - the "before" evaluation depends on it;
    - ``parameter_efficient``: False for full fine-tuning, whose point is to train every weight
      (the others get a warning when they train more than 5% of the model);
    - ``size_knob``: the ``method.<key>`` that sets how many parameters it trains (rank,
      prompt length, bottleneck width), an integer the count grows with, which
      ``budget.trainable_params`` tunes (:mod:`ftlab.planning.budget`); None: a fixed size.
    """

    artifact: str = "adapter"
    artifact_format: str = "peft"
    mergeable: bool = True
    merge_note: str = ""
    packing: bool = True
    quantized_base: bool = False
    base_quantization: str | None = None
    gradient_checkpointing: bool = False
    changes_model_at_init: bool = False
    parameter_efficient: bool = True
    size_knob: str | None = None


@runtime_checkable
class Method(Protocol):
    name: str
    traits: Traits

    def check(self, model: nn.Module) -> None:
        """Raise :class:`~ftlab.errors.ConfigError` if the method cannot apply to ``model``.

        Called on the meta-device model, before any weight is loaded.
        """

    def apply(self, model: nn.Module, total_steps: int) -> nn.Module:
        """Freeze what must stay frozen, inject what trains; return the model to train.

        ``total_steps`` is the number of optimizer steps the run will take (AdaLoRA's budget
        schedule needs it)."""

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups over the trainable parameters (each with its ``lr``)."""

    def build_optimizer(self, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer | None:
        """The method's own optimizer, or None for the configured one over :meth:`param_groups`."""

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """A penalty on the trained parameters, added to the loss once per optimizer step
        (AdaLoRA's orthogonality penalty), or None."""

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after every optimizer step; ``step`` counts steps done (1-based)."""

    def state_dict(self) -> dict[str, Any]:
        """State of the method itself (not of the model), saved in checkpoints."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save(self, model: nn.Module, directory: Path) -> None:
        """Save what was trained in the most portable format (peft's, wherever equivalent)."""

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        """Load what :meth:`save` wrote onto a freshly loaded base ``model``."""


class PlainHooks:
    """The hooks of a method that adds nothing to the training loop: the two usual parameter
    groups, nothing to do after an optimizer step, no state of its own to checkpoint.

    A method lists it as a base only for these defaults and overrides what it needs (LoRA+ its
    groups, Delta-LoRA its after-step update); it is not a place for shared behaviour."""

    traits = Traits()

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return default_param_groups(model, lr, weight_decay)

    def build_optimizer(self, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer | None:
        return None

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def default_param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups over the trainable parameters: weight decay on matrices, none on biases and
    norm weights (1-D tensors), the usual practice since BERT."""
    decay, no_decay = [], []
    for _, p in trainable_parameters(model):
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)``; 4-bit packed weights are counted as the values they hold."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


@torch.no_grad()
def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}
