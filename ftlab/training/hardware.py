"""Hardware: which combinations can run, the Lightning strategy, precision rules, ranks.

``conf/hardware/*.yaml`` (:class:`~ftlab.config.HardwareSettings`) says where a run trains:
accelerator, devices, nodes, strategy (``auto``, the ``ddp`` family, ``fsdp``, ``deepspeed``)
and precision. This module

- refuses impossible combinations before any weight loads (:func:`check_hardware`): checks of
  the settings alone always, checks of *this machine* (GPUs present, bf16 support, deepspeed
  installed) only when the run will really train here, so a laptop can plan a GPU run;
- builds the Lightning strategy (:func:`build_strategy`); FSDP wraps each decoder layer;
- fixes the dtype rule every run and the planner (:mod:`ftlab.planning.planner`) share
  (:func:`param_dtype`);
- says which process may write the run's outputs (:func:`ftlab.console.is_rank_zero`).

Precision rule (``hardware.precision``, orthogonal to ``model.quantization``):

======================  ====================================  ==========================
precision               frozen weights                        trainable weights, compute
======================  ====================================  ==========================
``32-true``             ``model.dtype`` (as loaded)           fp32 / dtype of the weights
``bf16-mixed``          ``model.dtype``                       fp32 master weights; bf16 autocast
``16-mixed``            ``model.dtype``                       fp32 master weights; fp16 autocast
``bf16-true``           bf16 (Lightning casts the module)     bf16
``16-true``             fp16                                  fp16
======================  ====================================  ==========================

Quantized base weights (``nf4``/``fp4``/``int8``, bitsandbytes) stay quantized whatever the
precision; what is not quantized (embeddings, norms, ``lm_head``) follows the table.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any

import torch
from torch import nn

from ftlab.config import SHARDED_STRATEGIES
from ftlab.errors import ConfigError

GPU_ACCELERATORS = ("gpu", "cuda")
HALF = {"bf16": torch.bfloat16, "16": torch.float16}


# ----------------------------------------------------------------------------- precision
def precision_parts(precision: str) -> tuple[torch.dtype | None, bool]:
    """``(half dtype or None, mixed?)``: ``bf16-mixed`` -> (bf16, True), ``32-true`` -> (None, False)."""
    head, _, tail = str(precision).partition("-")
    return HALF.get(head), tail == "mixed"


def param_dtype(precision: str, loaded: torch.dtype, trainable: bool) -> torch.dtype:
    """The dtype a floating parameter is held in during training (the table above)."""
    half, mixed = precision_parts(precision)
    if half is not None and not mixed:
        return half
    return torch.float32 if trainable else loaded


def keep_trainable_in_fp32(model: nn.Module, precision: str) -> int:
    """Upcast trainable half-precision parameters to fp32 unless the precision is ``*-true``.

    Mixed precision keeps fp32 master weights and autocasts the compute; a trainable bf16
    weight would silently make it pure-bf16 training (peft already keeps its adapters in fp32;
    this covers full fine-tuning of a bf16 checkpoint and any method that does not).
    Returns the number of parameters cast."""
    half, mixed = precision_parts(precision)
    if half is not None and not mixed:
        return 0  # Lightning casts the whole module to the half dtype
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            cast += p.numel()
    return cast


def cpu_supports_bf16() -> bool:
    """Native bf16 kernels on this CPU (oneDNN's test: AVX512-BF16/AMX on x86, BF16 on Arm)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


# ------------------------------------------------------------------------------- checks
def world_size(hardware) -> int | None:
    """Processes in the run (devices per node x nodes), or None when ``devices`` is ``auto``/-1
    and no GPU is visible to count them."""
    devices = hardware.devices
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, int) and devices > 0:
        n = devices
    elif hardware.accelerator in GPU_ACCELERATORS and torch.cuda.is_available():
        n = torch.cuda.device_count()
    elif hardware.accelerator == "cpu" and devices in ("auto", -1, "-1"):
        n = 1  # Lightning runs one CPU process for devices=auto
    else:
        return None
    return n * int(hardware.num_nodes)


def check_hardware(hardware, *, meta: nn.Module | None = None, here: bool = True) -> None:
    """Raise :class:`ConfigError` for hardware settings that cannot train.

    ``meta``: the model on the meta device (gradient checkpointing support). ``here``: also
    check this machine (GPUs, bf16, packages); off for dry runs, which plan a run for other
    hardware. (A quantized base with a sharding strategy is refused by
    :func:`ftlab.methods.quantized.check_quantized_base`.)"""
    hw = hardware
    strategy, precision = hw.strategy, str(hw.precision)
    half, mixed = precision_parts(precision)
    on_gpu = hw.accelerator in GPU_ACCELERATORS
    if strategy in SHARDED_STRATEGIES and not on_gpu:
        raise ConfigError(
            f"hardware.strategy={strategy} shards the model across GPUs and needs "
            f"hardware.accelerator=gpu (got {hw.accelerator!r}); on CPU use hardware=ddp, "
            "or plan the GPU run here with dry_run=true")
    if hw.accelerator == "cpu" and precision == "16-mixed":
        raise ConfigError(
            "hardware.precision=16-mixed (fp16 autocast) is not supported on CPU; use "
            "bf16-mixed, bf16-true or 32-true")
    if hw.gradient_checkpointing and meta is not None and _gradient_checkpointing_model(meta) is None:
        raise ConfigError(
            f"hardware.gradient_checkpointing=true, but {type(meta).__name__} does not support "
            "gradient checkpointing")
    if not here:
        return
    if on_gpu:
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found == 0:
            raise ConfigError(
                f"hardware.accelerator={hw.accelerator} but no CUDA GPU is visible here "
                "(torch.cuda.is_available() is False); use hardware=cpu, or plan the run "
                "with dry_run=true")
        wanted = len(hw.devices) if isinstance(hw.devices, (list, tuple)) else hw.devices
        if isinstance(wanted, int) and wanted > found:
            raise ConfigError(f"hardware.devices={wanted} but only {found} GPU(s) are visible here")
        if half is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                f"hardware.precision={precision}: this GPU has no bf16 support (before Ampere); "
                "use hardware.precision=16-mixed")
    elif hw.accelerator == "cpu" and half is torch.bfloat16 and not cpu_supports_bf16():
        raise ConfigError(
            f"hardware.precision={precision}: this CPU has no native bf16 support "
            "(no AVX512-BF16/AMX); use hardware.precision=32-true")
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("hardware.strategy=deepspeed needs the deepspeed package: pip install deepspeed")


# ----------------------------------------------------------------------------- strategy
def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of the model's repeated blocks (``LlamaDecoderLayer``...), from the
    ``_no_split_modules`` transformers declares for every architecture."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ConfigError(f"cannot find the decoder layers of {type(model).__name__} to wrap with FSDP")
    return classes


def build_strategy(hardware, model: nn.Module | None = None) -> Any:
    """The ``strategy`` argument of ``lightning.Trainer``.

    - ``fsdp``: FSDP with one unit per decoder layer; ``use_orig_params`` because frozen and
      trainable parameters share a unit under every adapter method.
    - ``deepspeed``: ZeRO stage ``hardware.strategy_options.stage`` (2: optimizer states and
      gradients sharded; 3: parameters too).
    - anything else: Lightning's own string (``auto``, ``ddp``...).
    """
    options = dict(hardware.strategy_options or {})
    if hardware.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        policy = decoder_layer_classes(model) if model is not None else None
        options.setdefault("use_orig_params", True)
        options.setdefault("state_dict_type", "full")
        return FSDPStrategy(auto_wrap_policy=policy, **options)
    if hardware.strategy == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(**options)
    return hardware.strategy


def zero_stage(hardware) -> int:
    """How much a strategy shards: 0 (replicated), 2 (grads + optimizer states), 3 (all)."""
    if hardware.strategy == "fsdp":
        mode = str((hardware.strategy_options or {}).get("sharding_strategy", "FULL_SHARD"))
        return {"NO_SHARD": 0, "SHARD_GRAD_OP": 2, "_HYBRID_SHARD_ZERO2": 2}.get(mode, 3)
    if hardware.strategy == "deepspeed":
        return int((hardware.strategy_options or {}).get("stage", 2))
    return 0


@contextlib.contextmanager
def full_parameters(trainer, module: nn.Module):
    """All ranks enter; inside, rank zero sees the whole (unsharded) parameters to save them."""
    strategy = type(trainer.strategy).__name__
    if strategy == "FSDPStrategy":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(trainer.strategy.model, writeback=False, rank0_only=True,
                                     offload_to_cpu=True):
            yield
    elif strategy == "DeepSpeedStrategy" and zero_stage_of(trainer) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def zero_stage_of(trainer) -> int:
    config = getattr(trainer.strategy, "config", None) or {}
    return int(config.get("zero_optimization", {}).get("stage", 0))


# --------------------------------------------------------------------- checkpointing
def _gradient_checkpointing_model(model: nn.Module):
    """The transformers model inside ``model`` (peft or native wrappers) that can checkpoint."""
    for m in model.modules():
        if getattr(m, "supports_gradient_checkpointing", False) and hasattr(m, "gradient_checkpointing_enable"):
            return m
    return None


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.

    Non-reentrant checkpointing (``use_reentrant=False``): works with frozen inputs (no
    ``enable_input_require_grads`` needed under adapters) and under DDP/FSDP."""
    target = _gradient_checkpointing_model(model)
    if target is None:
        raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(target, "activation_checkpointing_enable"):  # transformers 5 (the old name warns)
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(target.config, "use_cache", None):
        target.config.use_cache = False  # a KV cache is useless in training and clashes with it


# ----------------------------------------------------------------- launcher resolvers
def gpus_per_node(accelerator: str, devices) -> int:
    """GPUs a SLURM job asks for on each node (``conf/hydra/launcher/slurm.yaml``)."""
    if accelerator not in GPU_ACCELERATORS:
        return 0
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        return len(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    raise ConfigError(f"hydra/launcher=slurm needs hardware.devices as a number of GPUs per node, "
                      f"got {devices!r}")


def register_resolvers() -> None:
    """``${ftlab.gpus_per_node:...}`` and ``${ftlab.tasks_per_node:...}`` for launcher configs:
    one SLURM task per device, as Lightning's SLURM environment expects (one on CPU)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("ftlab.gpus_per_node", gpus_per_node, replace=True)
    OmegaConf.register_new_resolver("ftlab.tasks_per_node",
                                    lambda acc, dev: max(1, gpus_per_node(acc, dev)), replace=True)
