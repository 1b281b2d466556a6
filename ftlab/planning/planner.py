"""Plan a run without weights or data: parameters, and peak training memory per device.

``python -m ftlab model=llama2-7b method=lora hardware=gpu dry_run=true`` builds the model on
the meta device from its architecture (``model.arch``; no hub, no weights), applies the method
through the registry, and in seconds on a laptop prints and writes ``plan.json``:

- trainable and total parameters, by module type (layer indices folded to ``*``);
- the memory of one device during training, without and with gradient checkpointing, and
  whether it fits ``dry_run.device_memory_gb`` (GiB = 2^30 bytes, as nvidia-smi and torch count).

Memory model (bytes on one device; N = processes; P = parameters)
------------------------------------------------------------------
Each parameter is held in the dtype of the precision rule in :mod:`ftlab.training.hardware`
(``32-true``/``*-mixed``: frozen weights in ``model.dtype``, trainable weights fp32; ``*-true``:
everything in the half dtype). Then

- **weights** ``W = sum_p bytes(p)``; a base weight quantized by bitsandbytes (every
  ``nn.Linear`` but the output head) takes ``nf4``/``fp4``: 4 bits + one fp32 absmax per
  64-block, itself double-quantized to 8 bits with one fp32 constant per 256 blocks,
  ``(4 + 8/64 + 32/(64*256)) / 8 = 0.5159`` bytes (Dettmers et al., arXiv 2305.14314); ``int8``:
  1 byte + one fp32 scale per output row (arXiv 2208.07339).
- **gradients** ``G = sum_{p trainable} bytes(p)`` (a gradient has its parameter's dtype).
- **optimizer states** ``O = k * G``, ``k`` states per parameter in the parameter's dtype:
  Adam/AdamW 2 (exp_avg, exp_avg_sq), SGD with momentum 1, without 0 (:data:`OPTIMIZER_STATES`);
  bitsandbytes' 8-bit AdamW keeps each state in 1 + 4/256 bytes per value (tensors of at least
  ``min_8bit_size`` values; smaller ones in fp32).
- **activations** ``A``: the bytes autograd keeps for the backward pass at the end of the forward
  pass, for ``data.batch_size`` x ``data.max_length`` tokens (the longest batch a run can see).
  They are not guessed from a formula: the adapted model is traced once, forward then
  backward, on fake tensors (``FakeTensorMode``: shapes and dtypes, no memory), under the
  run's autocast, and every tensor storage allocated and freed is counted in order. The same
  trace gives **peak_step** = the highest total of live activations, temporaries and gradients
  at any op of the step. With gradient checkpointing each decoder layer keeps only its input,
  and the trace includes the recomputation in backward. Models are traced with 2 and 3
  decoder layers and extended to their depth (:func:`estimate_step`: every layer adds the
  same tensors), which takes a second or two for any size.
- Lightning zeroes gradients after the forward pass, so the previous step's gradients are
  alive during it: the trace starts with them allocated.

``peak = W + O + extra + max(peak_step, G + T_opt)``, where ``T_opt`` is the optimizer step's
temporary (Adam's ``sqrt(v)``: all trainable weights at once with the foreach kernels on GPU,
one tensor at a time on CPU) and ``extra`` is: DDP's gradient buckets (``G``, N > 1); FSDP's
gathered layers (two decoder layers at compute dtype: the current one and the prefetched one);
a quantized base's dequantized weight (the largest, at compute dtype) during each matmul.

Sharding divides what it shards by N (Rajbhandari et al., ZeRO, arXiv 1910.02054): FSDP
``FULL_SHARD`` and ZeRO-3 shard W, G and O; ``SHARD_GRAD_OP`` and ZeRO-2 shard G and O.
DeepSpeed under mixed precision holds half-precision weights and gradients and keeps the fp32
master weights with the optimizer states (``K = 12`` bytes per trainable parameter for Adam).
Activations are never sharded (each device runs its own micro-batch).

What it does not count: the CUDA context and kernels' workspaces (about 0.5-1 GiB per GPU),
allocator fragmentation, evaluation and generation (``eval.*``), which run outside the
training step. tests/test_plan.py checks the estimate against the allocator's measured peak of
real training steps on CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftlab.config import DDP_STRATEGIES, RunSettings
from ftlab.errors import ConfigError
from ftlab.io import write_json
from ftlab.methods import count_parameters, method_from_spec
from ftlab.methods.quantized import base_quantization
from ftlab.models.loading import _DTYPES, meta_model
from ftlab.planning.counts import held_dtypes, parameters_by_module, share_warning
from ftlab.planning.trace import GIB, apply_on_meta, estimate_step, quantized_weights, size_of
from ftlab.training.hardware import decoder_layer_classes, param_dtype, precision_parts, world_size, zero_stage

# Bytes per weight of a bitsandbytes-quantized base layer (see the module docstring).
QUANT_BYTES = {"nf4": (4 + 8 / 64 + 32 / (64 * 256)) / 8, "fp4": (4 + 8 / 64 + 32 / (64 * 256)) / 8,
               "int8": 1.0}
# Optimizer states per trainable parameter, by class name (in the parameter's dtype).
OPTIMIZER_STATES = {"AdamW": 2, "Adam": 2, "NAdam": 2, "RAdam": 2, "Adamax": 2, "Adagrad": 1,
                    "RMSprop": 1, "Adadelta": 2, "SGD": 1}
# bitsandbytes' 8-bit optimizers: one uint8 code per value and state, plus an fp32 absmax per block
# of 256 values (Dettmers et al., arXiv 2110.02861); tensors under min_8bit_size keep fp32 states.
EIGHT_BIT_STATE_BYTES = 1 + 4 / 256

# ------------------------------------------------------------------------------ results
@dataclass
class MemoryEstimate:
    """Bytes on one device during training."""

    gradient_checkpointing: bool
    weights: int
    gradients: int
    optimizer_states: int
    activations: int          # kept for backward at the end of the forward pass
    peak: int                 # the highest total at any moment of a training step
    traced: bool = True       # False: the activation trace failed (see Plan.notes)

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 3) for k, v in asdict(self).items() if isinstance(v, int)
                and not isinstance(v, bool)}


@dataclass
class Plan:
    model: str
    method: str
    precision: str
    quantization: str
    strategy: str
    devices: int
    batch_size: int
    seq_len: int
    trainable_params: int
    total_params: int
    modules: list[dict[str, Any]]
    memory: list[MemoryEstimate]
    device_memory_gb: float | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    held_in: str = ""  # the dtypes trainable and frozen parameters are held in

    def fits(self, estimate: MemoryEstimate) -> bool | None:
        if self.device_memory_gb is None:
            return None
        return estimate.peak <= self.device_memory_gb * GIB

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = "planned"
        out["memory"] = {("with" if m.gradient_checkpointing else "without") + "_checkpointing":
                         {**asdict(m), "gib": m.gib(), "fits": self.fits(m)} for m in self.memory}
        return out

    def table(self) -> str:
        share = 100 * self.trainable_params / max(1, self.total_params)
        quant = f", base {self.quantization}" if self.quantization != "none" else ""
        lines = [f"Plan: {self.model}, method {self.method}, precision {self.precision}{quant}, "
                 f"{self.devices} device(s), strategy {self.strategy}, "
                 f"batch {self.batch_size} x {self.seq_len} tokens",
                 f"Parameters: trainable {self.trainable_params:,} / total {self.total_params:,} "
                 f"({share:.4f}%)"]
        if self.held_in:
            lines.append(f"  held in ({self.precision}): {self.held_in}")
        lines.extend(self.warnings)
        width = max(len(r["module"]) for r in self.modules)
        lines.append(f"  {'module type':{width}} {'params':>15} {'trainable':>13}")
        for r in self.modules:
            lines.append(f"  {r['module']:{width}} {r['params']:>15,} {r['trainable']:>13,}")
        heads = ["no checkpointing" if not m.gradient_checkpointing else "grad. checkpointing"
                 for m in self.memory]
        unit, size = ("GiB", GIB) if max(m.peak for m in self.memory) >= GIB else ("MiB", 2**20)
        lines.append(f"Memory per device ({unit})      " + "".join(f"{h:>22}" for h in heads))
        for key, label in (("weights", "weights"), ("gradients", "gradients"),
                           ("optimizer_states", "optimizer states"),
                           ("activations", "activations (saved)"), ("peak", "peak (estimate)")):
            cells = []
            for m in self.memory:  # without a trace: no activations, the peak is a lower bound
                value = f"{getattr(m, key) / size:.2f}"
                cells.append(value if m.traced else {"activations": "n/a", "peak": ">= " + value}.get(key, value))
            lines.append(f"  {label:27}" + "".join(f"{c:>22}" for c in cells))
        if self.device_memory_gb is not None:
            verdict = ["fits" if self.fits(m) else "does NOT fit" for m in self.memory]
            lines.append(f"  {'in ' + format(self.device_memory_gb, 'g') + ' GiB':27}"
                         + "".join(f"{v:>22}" for v in verdict))
        else:
            lines.append("  (set dry_run.device_memory_gb=... to judge whether it fits)")
        lines.extend(f"Note: {n}" for n in self.notes)
        return "\n".join(lines)


# --------------------------------------------------------------------------- the planner
def plan_run(s: RunSettings, method=None) -> Plan:
    """Plan the run ``s`` describes; no weights or data are read. ``method``: the run's built
    method (its quantization and options are read; a fresh one is applied to meta models)."""
    method = method or method_from_spec(s.method)
    quantization = base_quantization(method, s.model.quantization)
    steps = max(1, s.max_steps)
    notes: list[str] = []

    base = meta_model(s.model)
    quantized = quantized_weights(base) if quantization != "none" else set()
    try:
        model = apply_on_meta(method_from_spec(s.method), base, steps)
    except Exception as err:  # noqa: BLE001  a method that cannot run on meta is a user-facing limit
        raise ConfigError(f"method {s.method['name']!r} cannot be applied on the meta device "
                          f"to plan the run: {type(err).__name__}: {str(err)[:300]}") from None
    if method.traits.gradient_checkpointing:
        notes.append(f"method {s.method['name']} turns on gradient checkpointing itself: "
                     "its runs take the right-hand column")
    trainable, total = count_parameters(model)

    n = world_size(s.hardware)
    if n is None:
        n = int(s.hardware.num_nodes)
        notes.append(f"hardware.devices={s.hardware.devices}: planned for {n} process(es); "
                     "set hardware.devices=N to plan for N devices per node")
    loaded = _DTYPES[s.model.dtype]
    budget = s.dry_run.device_memory_gb
    if budget is None and s.hardware.accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        budget = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
        notes.append(f"judged against this machine's GPU ({budget} GiB)")

    static = _static_memory(model, s, quantized, quantization, loaded, n)
    estimates = []
    for checkpointing in (False, True):
        try:
            step_peak, activations = estimate_step(s, quantization=quantization,
                                                   checkpointing=checkpointing, world=n)
            traced = True
        except Exception as err:  # noqa: BLE001  keep the counts; say why memory is partial
            notes.append(f"activation trace failed ({'with' if checkpointing else 'without'} "
                         f"checkpointing): {type(err).__name__}: {str(err)[:200]}")
            step_peak = activations = 0
            traced = False
        estimates.append(MemoryEstimate(
            gradient_checkpointing=checkpointing, weights=static["weights"],
            gradients=static["gradients"], optimizer_states=static["optimizer_states"],
            activations=activations,
            peak=static["weights"] + static["optimizer_states"] + static["extra"]
            + max(step_peak, static["gradients"] + static["optimizer_temp"]),
            traced=traced))
    return Plan(model=s.model.name, method=s.method["name"], precision=str(s.hardware.precision),
                quantization=quantization, strategy=s.hardware.strategy, devices=n,
                batch_size=s.data.batch_size, seq_len=s.data.max_length,
                trainable_params=trainable, total_params=total, modules=parameters_by_module(model),
                memory=estimates, device_memory_gb=budget, notes=notes,
                warnings=[w for w in [share_warning(method, s.method["name"], trainable, total)] if w],
                held_in=held_dtypes(model, str(s.hardware.precision), loaded))


def write_plan(plan: Plan, run_dir: Path) -> dict[str, Any]:
    out = plan.as_dict()
    write_json(Path(run_dir) / "plan.json", out)
    return out


def _optimizer_states(s: RunSettings) -> tuple[int, str]:
    factory = s.optimizer.factory
    cls = getattr(factory, "func", factory)
    name = getattr(cls, "__name__", str(cls))
    keywords = getattr(factory, "keywords", {}) or {}
    if name == "SGD":
        return (1 if keywords.get("momentum", 0) else 0), name
    if name == "RMSprop":
        return 1 + bool(keywords.get("momentum", 0)) + bool(keywords.get("centered", False)), name
    return OPTIMIZER_STATES.get(name, 2), name


def _static_memory(model: nn.Module, s: RunSettings, quantized: set[int], quantization: str,
                   loaded: torch.dtype, n: int) -> dict[str, int]:
    """Weights, gradients, optimizer states and fixed extras on one device (module docstring)."""
    precision = str(s.hardware.precision)
    half, mixed = precision_parts(precision)
    compute = half or loaded
    k, optimizer = _optimizer_states(s)
    keywords = getattr(s.optimizer.factory, "keywords", {}) or {}
    min_8bit = int(keywords.get("min_8bit_size", 4096)) if "8bit" in optimizer else None
    stage = zero_stage(s.hardware) if n > 1 else 0
    deepspeed_mixed = s.hardware.strategy == "deepspeed" and mixed
    weights = grads = states = opt_temp = largest_q = 0
    for p in model.parameters():
        numel = p.numel()
        if id(p) in quantized and not p.requires_grad:
            weights += math.ceil(numel * QUANT_BYTES[quantization])
            if quantization == "int8":
                weights += 4 * p.shape[0]
            largest_q = max(largest_q, numel * size_of(compute))
            continue
        dtype = param_dtype(precision, loaded, p.requires_grad) if p.is_floating_point() else p.dtype
        if not p.requires_grad:
            weights += numel * size_of(dtype)
            continue
        if deepspeed_mixed:  # half weights and grads; fp32 master copy beside the states
            weights += numel * size_of(half)
            grads += numel * size_of(half)
            states += numel * (4 + 4 * k)
        else:
            weights += numel * size_of(dtype)
            grads += numel * size_of(dtype)
            per_state = EIGHT_BIT_STATE_BYTES if min_8bit is not None and numel >= min_8bit else size_of(dtype)
            states += math.ceil(numel * k * per_state)
        if s.hardware.accelerator == "cpu":
            opt_temp = max(opt_temp, numel * size_of(dtype))
        else:
            opt_temp += numel * size_of(dtype)
    if optimizer == "SGD":
        opt_temp = 0  # SGD updates in place
    shard = 1 / n
    extra = largest_q
    if stage >= 3:
        weights = math.ceil(weights * shard)
    if stage >= 2:
        grads, opt_temp = math.ceil(grads * shard), math.ceil(opt_temp * shard)
    if stage >= 1:
        states = math.ceil(states * shard)
    if s.hardware.strategy in DDP_STRATEGIES and n > 1:
        extra += grads  # DDP's flat gradient buckets
    if stage >= 3:
        blocks = decoder_layer_classes(model)
        layer = max((sum(p.numel() for p in m.parameters())
                     for m in model.modules() if type(m) in blocks), default=0)
        extra += 2 * layer * size_of(compute)
    return {"weights": weights, "gradients": grads, "optimizer_states": states,
            "optimizer_temp": opt_temp, "extra": extra}


