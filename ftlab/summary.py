"""Parameter summaries printed at the start of every run."""

from __future__ import annotations

import re
from collections import OrderedDict

from torch import nn

from ftlab.methods.base import count_parameters

_INDEX = re.compile(r"\.\d+\.")
_PREFIXES = ("base_model.model.", "base_model.")


def trainable_by_module_type(model: nn.Module) -> "OrderedDict[str, tuple[int, int]]":
    """Trainable parameters grouped by module path with layer indices folded to ``*``:
    ``model.layers.*.self_attn.q_proj.lora_A`` -> (tensors, parameters)."""
    groups: "OrderedDict[str, tuple[int, int]]" = OrderedDict()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = name
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        key = _INDEX.sub(".*.", _INDEX.sub(".*.", key))
        key = key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key
        key = key.replace(".default", "")
        tensors, params = groups.get(key, (0, 0))
        groups[key] = (tensors + 1, params + p.numel())
    return groups


# A parameter-efficient method training more than this share of the model gets a warning.
PEFT_SHARE_LIMIT = 0.05


def share_warning(method, method_name: str, trainable: int, total: int) -> str | None:
    """A warning line when a parameter-efficient method (any method but one declaring
    ``parameter_efficient = False``, full fine-tuning) trains more than 5% of the parameters:
    prefix tuning's reparameterisation MLP trains 1.09B of Llama-2-7B's 7.8B, p-tuning's
    encoder 0.77B, which its gradients and optimizer states pay for."""
    if not getattr(method, "parameter_efficient", True) or trainable <= PEFT_SHARE_LIMIT * total:
        return None
    return (f"Warning: method {method_name} trains {100 * trainable / max(1, total):.1f}% of the model's "
            f"parameters, more than {PEFT_SHARE_LIMIT:.0%}: not parameter-efficient at this size "
            "(see the trainable module types)")


def held_dtypes(model: nn.Module, precision: str) -> str:
    """``trainable float32, frozen bfloat16``: the dtypes the parameters are held in while
    training under ``precision`` (``*-true`` casts every floating tensor to the half type;
    otherwise trainable tensors are fp32 masters and frozen ones keep their loaded dtype)."""
    from ftlab.hardware import param_dtype

    held: dict[bool, set[str]] = {True: set(), False: set()}
    for p in model.parameters():
        dtype = param_dtype(precision, p.dtype, p.requires_grad) if p.is_floating_point() else p.dtype
        held[p.requires_grad].add(str(dtype).removeprefix("torch."))
    return ", ".join(f"{kind} {' + '.join(sorted(held[flag])) or '-'}"
                     for kind, flag in (("trainable", True), ("frozen", False)))


def parameter_summary(model: nn.Module, method_name: str, method=None, precision: str | None = None) -> str:
    """Trainable and total counts, the dtypes they are held in under ``precision``, a
    warning for a parameter-efficient ``method`` over 5%, and the trainable module types."""
    trainable, total = count_parameters(model)
    lines = [f"Parameters ({method_name}): trainable {trainable:,} / total {total:,} "
             f"({100 * trainable / max(1, total):.4f}%)"]
    if precision is not None:
        lines.append(f"  held in ({precision}): {held_dtypes(model, precision)}")
    if method is not None and (warning := share_warning(method, method_name, trainable, total)):
        lines.append(warning)
    groups = trainable_by_module_type(model)
    if groups:
        width = max(len(k) for k in groups)
        lines.append(f"  {'trainable module type':{width}} {'tensors':>7} {'params':>13}")
        for key, (tensors, params) in groups.items():
            lines.append(f"  {key:{width}} {tensors:>7} {params:>13,}")
    return "\n".join(lines)
