"""Optimizer and learning-rate schedule, built from config over the method's parameter groups.

``conf/optimizer/`` holds torch's AdamW and SGD and bitsandbytes' memory-saving AdamW variants:

===================  ===========================================  ============
option               optimizer states per trainable value         hardware
===================  ===========================================  ============
``adamw``            2 x fp32 (8 bytes)                           any
``adamw8bit``        2 x uint8 + an fp32 absmax per 256 (2.03 B)  CPU and CUDA
``paged_adamw``      2 x fp32, in CUDA unified memory             CUDA only
``paged_adamw8bit``  2 x uint8 (2.03 B), in CUDA unified memory   CUDA only
===================  ===========================================  ============

8-bit states: Dettmers et al., arXiv 2110.02861 (block-wise dynamic quantization); paged
states: the QLoRA paper, arXiv 2305.14314. bitsandbytes 0.50 runs its 8-bit optimizers on the
CPU too (measured: the first step equals torch's AdamW exactly, later steps differ by the
quantization noise of the moments), but a paged one falls back there, with a warning only, to
the unpaged optimizer: :func:`check_optimizer` refuses that before any weight loads. Every one
of them takes parameter groups with their own ``lr`` and ``weight_decay`` (LoRA+, no decay on
biases and norms).
"""

from __future__ import annotations

import math

import torch

from ftlab.config import OptimizerSettings, SchedulerSettings
from ftlab.errors import ConfigError

CUDA_ACCELERATORS = ("gpu", "cuda")


def build_optimizer(settings: OptimizerSettings, param_groups: list[dict]) -> torch.optim.Optimizer:
    """``settings.factory(param_groups)``: each group keeps the ``lr`` its method gave it."""
    return settings.factory(param_groups)


def optimizer_class(settings: OptimizerSettings) -> type | None:
    """The class ``settings.factory`` builds (the factory is a ``functools.partial`` of it)."""
    cls = getattr(settings.factory, "func", settings.factory)
    return cls if isinstance(cls, type) else None


def is_paged(settings: OptimizerSettings) -> bool:
    """Whether the optimizer keeps its states in CUDA unified memory: bitsandbytes' ``Paged*``
    classes, or one of its optimizers built with ``is_paged=True``."""
    cls = optimizer_class(settings)
    if cls is None or not cls.__module__.startswith("bitsandbytes"):
        return False
    keywords = getattr(settings.factory, "keywords", None) or {}
    return cls.__name__.startswith("Paged") or bool(keywords.get("is_paged", False))


def check_optimizer(settings: OptimizerSettings, hardware, *, here: bool = True) -> None:
    """Raise :class:`ConfigError` for an optimizer the run's hardware cannot run as configured.

    A paged optimizer needs CUDA unified memory; on any other device bitsandbytes 0.50 trains
    with ordinary, unpaged states and only warns, so a run that asked for paging would silently
    measure something else. ``here``: ``accelerator=auto`` counts as CUDA only where a CUDA
    device is visible (a dry run, ``here=False``, gives it the benefit of the doubt)."""
    if not is_paged(settings):
        return
    accelerator = str(hardware.accelerator).lower()
    on_cuda = accelerator in CUDA_ACCELERATORS or (
        accelerator == "auto" and (not here or torch.cuda.is_available()))
    if on_cuda:
        return
    name = optimizer_class(settings).__name__
    instead = "optimizer=adamw8bit" if "8bit" in name else "optimizer=adamw or optimizer=adamw8bit"
    where = ("no CUDA device is visible here" if accelerator == "auto"
             else f"hardware.accelerator={accelerator}")
    raise ConfigError(
        f"optimizer {name} (bitsandbytes) pages its states through CUDA unified memory, which "
        f"needs a CUDA GPU, but {where}; bitsandbytes would silently train unpaged. Use {instead} "
        f"(8-bit states, runs on the CPU) here, or hardware=gpu on a machine with a CUDA GPU")


def lr_lambda(schedule: SchedulerSettings, total_steps: int):
    """Multiplier of the base learning rate at optimizer step ``t`` (0-based).

    Linear warmup from 0 over ``w`` steps, then constant, linear decay or cosine decay to
    ``min_lr_ratio`` at ``total_steps``.
    """
    warmup = schedule.warmup(total_steps)
    floor = schedule.min_lr_ratio

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / (warmup + 1)
        if schedule.name == "constant" or total_steps <= warmup:
            return 1.0
        progress = min(1.0, (t - warmup) / max(1, total_steps - warmup))
        if schedule.name == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(schedule: SchedulerSettings, optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, total_steps))
