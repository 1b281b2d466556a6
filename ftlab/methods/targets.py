"""Which layers a method adapts: ``all-linear``, target names and peft's matching rule.

peft matches a target name against a module's full path or its suffix after a dot; the
native methods use the same rule (:func:`matches`), so both backends adapt the same layers.
"""

from __future__ import annotations

from torch import nn

from ftlab.errors import ConfigError, did_you_mean


def matches(module_name: str, targets: list[str]) -> bool:
    """peft's rule: a target names the module's full path or its last dotted parts."""
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers a low-rank method can target (what 'all-linear' means)."""
    from transformers.pytorch_utils import Conv1D

    names = {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D)) or m.__class__.__name__ in ("Linear4bit", "Linear8bitLt")
    }
    names.discard("lm_head")
    return sorted(names)


def check_target_names(model: nn.Module, config) -> None:
    """Every listed target (and IA3 feed-forward module) must name at least one module, by
    peft's rule: the full module path or its suffix after a dot. peft itself only fails when
    *no* target matches, so a typo next to a valid name would silently adapt less."""
    names = [n for n, _ in model.named_modules() if n]
    for key, attr in (("target_modules", "target_modules"), ("feedforward_modules", "feedforward_modules")):
        targets = getattr(config, attr, None)
        if targets is None or isinstance(targets, str):
            continue  # "all-linear", a regex, or peft's per-architecture default
        for t in sorted(targets):
            if not any(matches(n, [t]) for n in names):
                raise ConfigError(
                    f"method.{key}: {t!r} matches no module of this model"
                    f"{did_you_mean(t, linear_module_names(model))}; "
                    f"its linear layers are: {', '.join(linear_module_names(model))}"
                )


def fmt_targets(targets) -> str:
    if isinstance(targets, (set, list, tuple)):
        return "[" + ",".join(sorted(targets)) + "]"
    return str(targets)
