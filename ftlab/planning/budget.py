"""Equal-budget comparison: ``budget.trainable_params=N`` sizes each method to about N
trainable parameters before the run is built.

A method declares which of its settings sets its size (``traits.size_knob``: LoRA's rank ``r``,
VeRA's rank ``r``, prompt length ``num_virtual_tokens``, the adapters' ``bottleneck``); the
count grows with it. The count for a value is the dry-run planner's: the method applied to the
model's meta-device architecture (no weights), trainable parameters counted
(:func:`ftlab.methods.count_parameters`, as in :mod:`ftlab.planning.counts`). The chosen value
k minimises ``|count(k) - N|`` (the smaller k on a tie) over k >= 1:

    count(1), count(2) -> a linear guess k0 = 1 + (N - count(1)) / (count(2) - count(1));
    then a bracket [lo, hi] with count(lo) <= N <= count(hi) grown from k0, and bisection,

so a count linear in k (LoRA: sum r (in + out); VeRA: sum (out + r)) takes a handful of counts,
and any count that only grows with k is still found exactly. A method without a size knob (full
fine-tuning, IA3), or whose count does not move with it, keeps its size and is reported as
fixed-size with its count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ftlab.config import RunSettings
from ftlab.methods import count_parameters, method_from_spec
from ftlab.models.loading import meta_model
from ftlab.planning.trace import apply_on_meta

MAX_SIZE = 1 << 16  # the largest knob value searched


@dataclass(frozen=True)
class Budget:
    """What ``budget.trainable_params`` chose for one run (written to metrics.json)."""

    target: int
    knob: str | None        # the method.<key> that was set; None: a fixed-size method
    value: int | None       # its chosen value
    trainable_params: int   # the count at that value (the planner's count)

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "knob": self.knob, "value": self.value,
                "trainable_params": self.trainable_params, "fixed_size": self.knob is None,
                "difference": self.trainable_params - self.target}

    def line(self, method: str) -> str:
        off = self.trainable_params - self.target
        if self.knob is None:
            return (f"Budget {self.target:,} trainable parameters: method {method} has no size setting "
                    f"(fixed size), {self.trainable_params:,} trainable ({off:+,})")
        return (f"Budget {self.target:,} trainable parameters: method.{self.knob}={self.value} gives "
                f"{self.trainable_params:,} trainable ({off:+,}, {100 * off / self.target:+.1f}%)")


def trainable_count(s: RunSettings, spec: dict[str, Any]) -> int:
    """Trainable parameters of method ``spec`` on ``s``'s model, counted as the planner counts."""
    model = apply_on_meta(method_from_spec(spec), meta_model(s.model), max(1, s.max_steps))
    return count_parameters(model)[0]


def choose(count, target: int, limit: int = MAX_SIZE) -> int:
    """The k in [1, limit] with ``count(k)`` closest to ``target`` (module docstring);
    ``count`` must not decrease with k."""
    c1, c2 = count(1), count(2)
    if target <= c1:
        return 1
    guess = 1 + round((target - c1) / (c2 - c1)) if c2 > c1 else 2
    guess = min(max(guess, 1), limit)
    lo, hi, step = guess, guess, 1
    while count(lo) > target:  # grow downwards until count(lo) <= target
        hi, lo, step = lo, max(1, lo - step), step * 2
    while count(hi) < target:  # and upwards until count(hi) >= target
        if hi == limit or (hi > lo and count(hi) == count(lo)):
            # The end of the range, or a plateau (the knob stops adding parameters, e.g. a rank
            # capped by a layer's size): the smallest value with that count.
            return _first_reaching(count, count(hi), hi)
        lo, hi, step = hi, min(limit, hi + step), step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= target else (lo, mid)
    return min((lo, hi), key=lambda k: (abs(count(k) - target), k))


def _first_reaching(count, c: int, hi: int) -> int:
    """The smallest k in [1, hi] with ``count(k) >= c`` (``count(hi) >= c``), by bisection."""
    lo = 0  # count(0) is taken as below c
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if count(mid) >= c else (mid, hi)
    return hi


def fit_budget(s: RunSettings, target: int | None) -> tuple[RunSettings, Budget | None]:
    """``s`` with the method's size knob set for ``target`` trainable parameters (module
    docstring), and what was chosen; ``target=None``: ``s`` unchanged."""
    if target is None:
        return s, None
    knob = method_from_spec(s.method).traits.size_knob
    counts: dict[int, int] = {}

    def count(k: int) -> int:
        if k not in counts:
            counts[k] = trainable_count(s, {**s.method, knob: k})
        return counts[k]

    if knob is None or count(2) == count(1):
        return s, Budget(target, None, None, trainable_count(s, s.method))
    value = choose(count, target)
    chosen = dataclasses.replace(s, method={**s.method, knob: value})
    return chosen, Budget(target, knob, value, count(value))
