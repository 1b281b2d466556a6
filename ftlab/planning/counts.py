"""Parameter counts by module type, for the run's summary and the dry-run plan.

Layer indices fold to ``*`` and peft's wrapper prefixes are dropped, so a 32-layer model's
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight`` counts under
``model.layers.*.self_attn.q_proj.lora_A``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

from torch import nn

from ftlab.methods.base import count_parameters

_INDEX = re.compile(r"\.\d+(?=\.|$)")
_DEFAULT = re.compile(r"\.default(?=\.|$)")  # peft's adapter name, a whole path part
_WRAPPERS = ("base_model.model.", "base_model.")


def module_type(name: str) -> str:
    """``base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight`` ->
    ``model.layers.*.self_attn.q_proj.lora_A``."""
    for prefix in _WRAPPERS:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    name = _DEFAULT.sub("", _INDEX.sub(".*", name))
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name


def parameters_by_module(model: nn.Module, trainable_only: bool = False) -> list[dict[str, Any]]:
    """Rows ``{"module", "tensors", "params", "trainable"}`` in model order (tied weights
    counted once); ``trainable_only``: only the parameters that train."""
    rows: "OrderedDict[str, list[int]]" = OrderedDict()
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        row = rows.setdefault(module_type(name), [0, 0, 0])
        row[0] += 1
        row[1] += p.numel()
        row[2] += p.numel() if p.requires_grad else 0
    return [{"module": k, "tensors": v[0], "params": v[1], "trainable": v[2]} for k, v in rows.items()]


# A parameter-efficient method training more than this share of the model gets a warning.
PEFT_SHARE_LIMIT = 0.05


def share_warning(method, method_name: str, trainable: int, total: int) -> str | None:
    """A warning line when a parameter-efficient method (``traits.parameter_efficient``: every
    method but full fine-tuning) trains more than 5% of the parameters: prefix tuning's
    reparameterisation MLP trains 1.09B of Llama-2-7B's 7.8B, p-tuning's encoder 0.77B, which
    its gradients and optimizer states pay for."""
    if not method.traits.parameter_efficient or trainable <= PEFT_SHARE_LIMIT * total:
        return None
    return (f"Warning: method {method_name} trains {100 * trainable / max(1, total):.1f}% of the model's "
            f"parameters, more than {PEFT_SHARE_LIMIT:.0%}: not parameter-efficient at this size "
            "(see the trainable module types)")


def held_dtypes(model: nn.Module, precision: str, loaded=None) -> str:
    """``trainable float32, frozen bfloat16``: the dtypes the parameters are held in while
    training under ``precision`` (``*-true`` casts every floating tensor to the half type;
    otherwise trainable tensors are fp32 masters and frozen ones keep their loaded dtype;
    ``loaded``: that dtype, for a meta-device model built in another one)."""
    from ftlab.training.hardware import param_dtype

    held: dict[bool, set[str]] = {True: set(), False: set()}
    for p in model.parameters():
        dtype = param_dtype(precision, loaded or p.dtype, p.requires_grad) if p.is_floating_point() else p.dtype
        held[p.requires_grad].add(str(dtype).removeprefix("torch."))
    return ", ".join(f"{kind} {' + '.join(sorted(held[flag])) or '-'}"
                     for kind, flag in (("trainable", True), ("frozen", False)))


def parameter_summary(model: nn.Module, method_name: str, method=None, precision: str | None = None) -> str:
    """The table printed at the start of every run: trainable and total counts, the dtypes they
    are held in under ``precision``, a warning for a parameter-efficient ``method`` over 5%,
    and the trainable parameters by module type."""
    trainable, total = count_parameters(model)
    lines = [f"Parameters ({method_name}): trainable {trainable:,} / total {total:,} "
             f"({100 * trainable / max(1, total):.4f}%)"]
    if precision is not None:
        lines.append(f"  held in ({precision}): {held_dtypes(model, precision)}")
    if method is not None and (warning := share_warning(method, method_name, trainable, total)):
        lines.append(warning)
    rows = [r for r in parameters_by_module(model, trainable_only=True)]
    if rows:
        header = "trainable module type"
        width = max(len(header), *(len(r["module"]) for r in rows))
        lines.append(f"  {header:{width}} {'tensors':>7} {'params':>13}")
        for r in rows:
            lines.append(f"  {r['module']:{width}} {r['tensors']:>7} {r['trainable']:>13,}")
    return "\n".join(lines)
