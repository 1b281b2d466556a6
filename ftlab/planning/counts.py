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
_WRAPPERS = ("base_model.model.", "base_model.")


def module_type(name: str) -> str:
    """``base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight`` ->
    ``model.layers.*.self_attn.q_proj.lora_A``."""
    for prefix in _WRAPPERS:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    name = _INDEX.sub(".*", name).replace(".default", "")
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


def parameter_summary(model: nn.Module, method_name: str) -> str:
    """The table printed at the start of every run: trainable parameters by module type."""
    trainable, total = count_parameters(model)
    lines = [f"Parameters ({method_name}): trainable {trainable:,} / total {total:,} "
             f"({100 * trainable / max(1, total):.4f}%)"]
    rows = [r for r in parameters_by_module(model, trainable_only=True)]
    if rows:
        width = max(len(r["module"]) for r in rows)
        lines.append(f"  {'trainable module type':{width}} {'tensors':>7} {'params':>13}")
        for r in rows:
            lines.append(f"  {r['module']:{width}} {r['tensors']:>7} {r['trainable']:>13,}")
    return "\n".join(lines)
