"""Full fine-tuning: every weight trains; saved as a complete model directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ftlab.methods.base import PlainHooks, Traits
from ftlab.methods.registry import register


@dataclass
class FullFinetune(PlainHooks):
    """Full fine-tuning: every weight trains; saved as a complete model directory."""

    name: str = "full"
    # 4-bit and 8-bit weights cannot take gradient steps; the trained model is the export.
    traits = Traits(artifact="model", artifact_format="model", parameter_efficient=False,
                    merge_note="full fine-tuning trained every weight: writing the full model")

    def check(self, model: nn.Module) -> None:
        pass

    def apply(self, model: nn.Module, total_steps: int) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(str(directory))

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        # The same class as the base (a causal LM, or a classifier with its trained head).
        return type(model).from_pretrained(str(directory), dtype=model.dtype)


@register("full")
def full() -> FullFinetune:
    return FullFinetune()
