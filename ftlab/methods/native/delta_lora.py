"""Delta-LoRA: Zi et al., "Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of
Low-Rank Matrices", arXiv 2309.02411. No library implements it.

A and B train as in LoRA (A Kaiming-uniform, B = 0, ``h = W x + s B A x``, s = alpha / r), with
no dropout on the branch (the paper removes it so that the gradient of the branch equals the
gradient W would get). After every optimizer step the frozen weight W also moves, with no
gradient and no optimizer state of its own (Algorithm 1 of the paper, iterations t = 0..T-1):

    if t > K:   W(t+1) = W(t) + lambda * s * (B(t+1) A(t+1) - B(t) A(t))

``lambda`` is the paper's *update ratio* (``method.update_ratio``), ``K`` its *start steps*
(``method.start_step``). ftlab's ``after_optimizer_step`` counts steps from 1 (step = t + 1), so
W first moves after optimizer step K + 2: the first K + 1 steps are plain LoRA.
Defaults lambda = 2, K = 500: "We use update ratio lambda = 2 and set start steps K = 500 for
Delta-LoRA" (the paper's implementation details, as quoted by a third-party implementation;
the PDF itself could not be read here). Short runs never reach K = 500: lower
``method.start_step`` (e.g. 10) to see W move.

Bookkeeping. Instead of the product B A, each layer keeps its factors (A, B) after the last step,
``prev`` (r x (in + out) numbers, not out x in), and the factors after step K, ``anchor``. The
updates telescope, so at every step

    W = W0 + D,   D = lambda * s * (B_prev A_prev - B_anchor A_anchor)   (D = 0 before K),

which makes both the method state and the export small: :meth:`DeltaLora.state_dict` holds
the factors (low rank), and :meth:`DeltaLora.load_state_dict` re-derives W from them, so a
checkpoint with only A, B and this state restores W.

Precision. W is never updated in place: each layer keeps its starting weight W0 (a
non-persistent buffer ``delta_lora_base``, one more copy of each adapted weight in the base's
dtype) and after every step W is set to ``W0 + D``, D computed in float32 (or wider) from the
factors and rounded once to W's dtype. On a bf16 base the per-step deltas (about lr |B| |A|)
lie far below bf16's resolution of 2^-9 relative; added one at a time they mostly rounded
away, while the export carried the intended D (a 4096 x 4096 weight N(0, 0.02), B at N(0, 0.01),
50 steps moving A and B by 2e-4 each: W equalled round_bf16(W0 + the rule's sum) in 24% of its
entries, the change was 0.71 off that in norm; now 100%). With one rounding W is within half a
bf16 ulp of the rule, whatever the number of steps.

Export (``save``). The whole change from the base model is
``W - W0 + s B A = s [(1 + lambda) B A - lambda B_anchor A_anchor]``, a matrix of rank <= 2r.
It is written as a plain peft LoRA adapter of rank 2r (A' = [A; A_anchor],
B' = [(1 + lambda) B, -lambda B_anchor], lora_alpha = 2 alpha so the scaling stays s), or of
rank r before W has moved. ``PeftModel.from_pretrained(original_base, dir)`` therefore gives
the Delta-LoRA model's outputs (up to float rounding) without shipping full weights; ``load``
splits the factors again and restores W, A, B and the method state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftlab.errors import ConfigError, check_positive
from ftlab.methods.base import PlainHooks, Traits, default_param_groups
from ftlab.methods.native.common import PEFT_PREFIX, head_tensors, load_named, read_peft_format, save_peft_format
from ftlab.methods.native.lora import LoraLinear, NativeLora, lora_layers, peft_lora_config
from ftlab.methods.checks import check_targets
from ftlab.methods.registry import register

Factors = tuple[torch.Tensor, torch.Tensor]  # (A, B)
BASE = "delta_lora_base"  # each layer's buffer holding W0


def _factors(layer: LoraLinear) -> Factors:
    return layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone()


def _layout(layer: LoraLinear, delta: torch.Tensor) -> torch.Tensor:
    return delta.T if layer.fan_in_fan_out else delta


@dataclass
class DeltaLora(PlainHooks):
    """LoRA whose frozen weight follows the delta of B A after ``start_step`` (module docstring)."""

    r: int = 8
    alpha: float = 16
    update_ratio: float = 2.0
    start_step: int = 500
    target_modules: Any = ("q_proj", "v_proj")
    name: str = "delta_lora"
    traits = Traits(size_knob="r", merge_note="Delta-LoRA also moved the base weights during training: writing its "
                               "full weights (base + its weight updates + the low-rank adapter)")
    step: int = field(default=0, init=False)
    _layers: dict[str, LoraLinear] = field(default_factory=dict, init=False, repr=False)
    _prev: dict[str, Factors] = field(default_factory=dict, init=False, repr=False)
    _anchor: dict[str, Factors] = field(default_factory=dict, init=False, repr=False)
    _pending: dict[str, Any] | None = field(default=None, init=False, repr=False)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def _lora(self) -> NativeLora:
        return NativeLora(r=self.r, alpha=self.alpha, dropout=0.0, target_modules=self.target_modules,
                          name=self.name)

    def check(self, model: nn.Module) -> None:
        self._lora().check(model)

    def apply(self, model: nn.Module, total_steps: int = 0) -> nn.Module:
        self._lora().apply(model)
        self._layers = lora_layers(model)
        for layer in self._layers.values():
            # A buffer, so it follows the model through .to(device) and Lightning's dtype cast.
            layer.register_buffer(BASE, layer.base_layer.weight.detach().clone(), persistent=False)
        self._prev = {name: _factors(layer) for name, layer in self._layers.items()}
        self._anchor, self.step = {}, 0
        if self._pending is not None:  # state loaded before the layers existed
            state, self._pending = self._pending, None
            self.load_state_dict(state)
        return model

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        # W is frozen (requires_grad False), so it is in no group and gets no optimizer state.
        return default_param_groups(model, lr, weight_decay)

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        moving = (step - 1) > self.start_step and self.update_ratio != 0
        with torch.no_grad():
            for name, layer in self._layers.items():
                if moving:
                    self._anchor.setdefault(name, self._prev[name])
                self._prev[name] = _factors(layer)
                if moving:
                    self._set_weight(name)
        self.step = step

    # -- W = W0 + D(prev, anchor) -------------------------------------------------------------
    def moved(self, name: str) -> torch.Tensor | None:
        """D for one layer (in its weight layout), or None while W has not moved."""
        if name not in self._anchor:
            return None
        w0 = getattr(self._layers[name], BASE)
        # At least float32 even when the factors are bf16 (bf16-true): D is the difference of
        # two nearly equal products.
        def wide(t: torch.Tensor) -> torch.Tensor:
            return t.to(w0.device, torch.promote_types(t.dtype, torch.float32))

        (a, b), (a0, b0) = [tuple(map(wide, f)) for f in (self._prev[name], self._anchor[name])]
        return _layout(self._layers[name], (b @ a - b0 @ a0) * (self.update_ratio * self.scaling))

    def _set_weight(self, name: str) -> None:
        """W = W0 + D with a single rounding to W's dtype (W = W0 while D does not exist)."""
        layer = self._layers[name]
        with torch.no_grad():
            w0, d = getattr(layer, BASE), self.moved(name)
            w = w0 if d is None else w0.to(d.dtype) + d
            layer.base_layer.weight.copy_(w.to(layer.base_layer.weight.dtype))

    def _sync(self) -> None:
        for name in self._layers:
            self._set_weight(name)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "prev": dict(self._prev), "anchor": dict(self._anchor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if not self._layers:
            self._pending = state
            return
        device = next(iter(self._layers.values())).lora_A.weight.device
        self._prev = {n: tuple(t.to(device) for t in f) for n, f in state["prev"].items()}
        self._anchor = {n: tuple(t.to(device) for t in f) for n, f in state["anchor"].items()}
        self.step = int(state["step"])
        self._sync()

    # -- export: the whole change as a peft LoRA adapter of rank r or 2r ----------------------
    def save(self, model: nn.Module, directory: Path) -> None:
        layers = lora_layers(model)
        tensors = {}
        lam = self.update_ratio
        for name, layer in layers.items():
            a, b = _factors(layer)
            if any(not torch.equal(x, y) for x, y in zip((a, b), self._prev[name])):
                raise RuntimeError("Delta-LoRA save: A, B changed since the last after_optimizer_step")
            if name in self._anchor:
                a0, b0 = self._anchor[name]
                a, b = torch.cat([a, a0], 0), torch.cat([(1 + lam) * b, -lam * b0], 1)
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        rank = self.r * (2 if self._anchor else 1)
        config = peft_lora_config(model, rank, self.alpha * rank / self.r, 0.0, False)
        meta = {"ftlab_method": self.name, "r": str(self.r), "alpha": repr(float(self.alpha)),
                "update_ratio": repr(float(lam)), "start_step": str(self.start_step), "step": str(self.step)}
        save_peft_format(Path(directory), config, {**tensors, **head_tensors(model)}, meta)

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        """Restore a Delta-LoRA model from :meth:`save`'s adapter onto the original base:
        adopts the saved r, alpha, update_ratio and start_step."""
        config, tensors, meta = read_peft_format(Path(directory), "LORA")
        if meta.get("ftlab_method") != self.name:
            raise ValueError(f"{directory} was not written by Delta-LoRA (no ftlab_method metadata)")
        self.r, self.alpha = int(meta["r"]), float(meta["alpha"])
        self.update_ratio, self.start_step = float(meta["update_ratio"]), int(meta["start_step"])
        self.target_modules = config["target_modules"]
        self.apply(model)
        r, lam = self.r, self.update_ratio
        with torch.no_grad():
            for name, layer in self._layers.items():
                a = tensors.pop(f"{PEFT_PREFIX}{name}.lora_A.weight")
                b = tensors.pop(f"{PEFT_PREFIX}{name}.lora_B.weight")
                if a.shape[0] == 2 * r:
                    self._anchor[name] = (a[r:].to(layer.lora_A.weight), (b[:, r:] / -lam).to(layer.lora_A.weight))
                    a, b = a[:r], b[:, :r] / (1 + lam)
                layer.lora_A.weight.copy_(a)
                layer.lora_B.weight.copy_(b)
                self._prev[name] = _factors(layer)
        heads = {k: tensors.pop(k) for k in head_tensors(model) if k in tensors}
        load_named(model, heads, None, directory)  # the classification head, if any
        if tensors:
            raise ValueError(f"{directory}: tensors with no place in this model: {sorted(tensors)[:3]}")
        self.step = int(meta["step"])
        self._sync()
        return model


@register("delta_lora")
def delta_lora(r: int = 8, alpha: float = 16, update_ratio: float = 2.0, start_step: int = 500,
               target_modules: list[str] | str = ("q_proj", "v_proj")) -> DeltaLora:
    """Delta-LoRA (arXiv 2309.02411): LoRA plus W += lambda s (B'A' - BA) after step K."""
    check_positive("method.r", r, integer=True)
    check_positive("method.alpha", alpha)
    if isinstance(update_ratio, bool) or not isinstance(update_ratio, (int, float)) or update_ratio < 0:
        raise ConfigError(f"method.update_ratio must be a number >= 0, got {update_ratio!r}")
    if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
        raise ConfigError(f"method.start_step must be an integer >= 0, got {start_step!r}")
    return DeltaLora(r=r, alpha=alpha, update_ratio=float(update_ratio), start_step=start_step,
                     target_modules=check_targets(target_modules))
