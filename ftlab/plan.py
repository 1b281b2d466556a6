"""Plan a run without weights or data: parameters, and peak training memory per device.

``python -m ftlab model=llama2-7b method=lora hardware=gpu dry_run=true`` builds the model on
the meta device from its architecture (``model.arch``; no hub, no weights), applies the method
through the registry, and in seconds on a laptop prints and writes ``plan.json``:

- trainable and total parameters, by module type (layer indices folded to ``*``);
- the memory of one device during training, without and with gradient checkpointing, and
  whether it fits ``dry_run.device_memory_gb`` (GiB = 2^30 bytes, as nvidia-smi and torch count).

Memory model (bytes on one device; N = processes; P = parameters)
------------------------------------------------------------------
Each parameter is held in the dtype of the precision rule in :mod:`ftlab.hardware`
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
  and the trace includes the recomputation in backward. The loss is the run's own
  (:func:`ftlab.loss.loss_sum`): with ``loss.chunk_size > 0`` no ``[tokens x vocabulary]``
  logits are kept for backward, and only one chunk's live during the loss. Models are traced with 2 and 3
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
import re
import sys
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftlab.config import DDP_STRATEGIES, RunSettings
from ftlab.errors import ConfigError
from ftlab.hardware import (decoder_layer_classes, enable_gradient_checkpointing, param_dtype,
                            precision_parts, world_size, zero_stage)
from ftlab.loss import loss_sum
from ftlab.methods import build_method, count_parameters
from ftlab.models.loading import _DTYPES, meta_model, model_config

GIB = 2**30
# Bytes per weight of a bitsandbytes-quantized base layer (see the module docstring).
QUANT_BYTES = {"nf4": (4 + 8 / 64 + 32 / (64 * 256)) / 8, "fp4": (4 + 8 / 64 + 32 / (64 * 256)) / 8,
               "int8": 1.0}
# Optimizer states per trainable parameter, by class name (in the parameter's dtype).
OPTIMIZER_STATES = {"AdamW": 2, "Adam": 2, "NAdam": 2, "RAdam": 2, "Adamax": 2, "Adagrad": 1,
                    "RMSprop": 1, "Adadelta": 2, "SGD": 1}
# bitsandbytes' 8-bit optimizers: one uint8 code per value and state, plus an fp32 absmax per block
# of 256 values (Dettmers et al., arXiv 2110.02861); tensors under min_8bit_size keep fp32 states.
EIGHT_BIT_STATE_BYTES = 1 + 4 / 256
_INDEX = re.compile(r"\.\d+(?=\.|$)")
_WRAPPERS = ("base_model.model.", "base_model.")


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
    method = method or _build(s)
    own = getattr(method, "base_quantization", None)
    quantization = s.model.quantization
    if quantization == "none" and own:
        quantization = own
    steps = max(1, s.max_steps)
    notes: list[str] = []

    base = meta_model(s.model)
    quantized = quantized_weights(base) if quantization != "none" else set()
    try:
        model = apply_on_meta(_build(s), base, steps)
    except Exception as err:  # noqa: BLE001  a method that cannot run on meta is a user-facing limit
        raise ConfigError(f"method {s.method['name']!r} cannot be applied on the meta device "
                          f"to plan the run: {type(err).__name__}: {str(err)[:300]}") from None
    if getattr(method, "gradient_checkpointing", False):
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
                memory=estimates, device_memory_gb=budget, notes=notes)


def apply_on_meta(method, base: nn.Module, steps: int) -> nn.Module:
    """``method.apply`` with new tensors on the meta device too: a method that creates its
    modules on the default device (peft's prompt encoders) allocates nothing."""
    with torch.device("meta"):
        return method.apply(base, steps)


def _build(s: RunSettings):
    """A fresh method object of the run's settings (applying one may keep state in it)."""
    return build_method(s.method["name"], **{k: v for k, v in s.method.items() if k != "name"})


def write_plan(plan: Plan, run_dir: Path) -> dict[str, Any]:
    from ftlab.run import write_json

    out = plan.as_dict()
    write_json(Path(run_dir) / "plan.json", out)
    return out


# ------------------------------------------------------------------------ parameters
def module_type(name: str) -> str:
    """``base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight`` ->
    ``model.layers.*.self_attn.q_proj.lora_A``."""
    for prefix in _WRAPPERS:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    name = _INDEX.sub(".*", name).replace(".default", "")
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name


def parameters_by_module(model: nn.Module) -> list[dict[str, Any]]:
    """Rows ``{"module", "params", "trainable"}`` in model order (tied weights counted once)."""
    rows: "OrderedDict[str, list[int]]" = OrderedDict()
    for name, p in model.named_parameters():
        row = rows.setdefault(module_type(name), [0, 0])
        row[0] += p.numel()
        row[1] += p.numel() if p.requires_grad else 0
    return [{"module": k, "params": v[0], "trainable": v[1]} for k, v in rows.items()]


def quantized_weights(model: nn.Module) -> set[int]:
    """``id`` of the weights bitsandbytes would quantize: every plain ``nn.Linear`` except the
    output head (transformers keeps ``lm_head`` and tied embeddings in the compute dtype)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return {id(m.weight) for m in model.modules()
            if type(m) is nn.Linear and m is not head and id(m.weight) not in tied}


# ------------------------------------------------------------------------- static part
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
            largest_q = max(largest_q, numel * _size(compute))
            continue
        dtype = param_dtype(precision, loaded, p.requires_grad) if p.is_floating_point() else p.dtype
        if not p.requires_grad:
            weights += numel * _size(dtype)
            continue
        if deepspeed_mixed:  # half weights and grads; fp32 master copy beside the states
            weights += numel * _size(half)
            grads += numel * _size(half)
            states += numel * (4 + 4 * k)
        else:
            weights += numel * _size(dtype)
            grads += numel * _size(dtype)
            per_state = EIGHT_BIT_STATE_BYTES if min_8bit is not None and numel >= min_8bit else _size(dtype)
            states += math.ceil(numel * k * per_state)
        if s.hardware.accelerator == "cpu":
            opt_temp = max(opt_temp, numel * _size(dtype))
        else:
            opt_temp += numel * _size(dtype)
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
        extra += 2 * layer * _size(compute)
    return {"weights": weights, "gradients": grads, "optimizer_states": states,
            "optimizer_temp": opt_temp, "extra": extra}


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# -------------------------------------------------------------------------- the trace
class _LiveBytes:
    """Counts tensor storages as they are allocated and freed, op by op.

    A ``TorchDispatchMode`` sees every op's outputs; a storage not seen before is an
    allocation, and a weak reference with a callback records its release. The timeline is
    kept as events so that the gradients' share can be re-weighted afterwards (sharded)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.weak import WeakIdKeyDictionary

        tracker = self
        self.events: list[tuple[int, int]] = []   # (key, +bytes or -bytes)
        self.marks: dict[str, int] = {}
        self._keys = WeakIdKeyDictionary()
        self._refs: list[weakref.ref] = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    # A value read in the forward pass (``.item()``): fake tensors have none.
                    # Only random choices read one there (LoHa's module dropout: ``rand(1) > p``);
                    # 1/True takes the branch that computes, the one that costs memory.
                    return {torch.bool: True}.get(args[0].dtype, 1 if not args[0].is_floating_point() else 1.0)
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker.track(t)
                return out

        self.mode = Mode()

    def track(self, t: torch.Tensor, count: bool = True) -> int:
        st = t.untyped_storage()
        key = self._keys.get(st)
        if key is not None:
            return key
        key = len(self._refs)
        self._keys[st] = key
        nbytes = st.nbytes() if count else 0
        if nbytes:
            self.events.append((key, nbytes))
            self._refs.append(weakref.ref(st, lambda _, k=key, b=nbytes: self.events.append((k, -b))))
        else:
            self._refs.append(weakref.ref(st))
        return key

    def mark(self, name: str) -> None:
        self.marks[name] = len(self.events)

    def replay(self, weight: dict[int, float]) -> tuple[dict[str, float], dict[str, float]]:
        """``({mark: peak from that mark to the next}, {mark: live bytes at the mark})``, with
        each key's bytes times its weight."""
        live = 0.0
        at: dict[str, float] = {}
        peaks: dict[str, float] = {}
        starts = {v: k for k, v in self.marks.items()}
        phase = None
        for i, (key, nbytes) in enumerate(self.events):
            if i in starts:
                phase = starts[i]
                at[phase] = peaks[phase] = live
            live += nbytes * weight.get(key, 1.0)
            if phase is not None:
                peaks[phase] = max(peaks[phase], live)
        for i, name in starts.items():
            if i >= len(self.events):
                at[name] = peaks[name] = live
        return peaks, at


def estimate_step(s: RunSettings, *, quantization: str = "none", checkpointing: bool = False,
                  world: int = 1) -> tuple[int, int]:
    """``(peak_step, activations)`` of :func:`trace_training_step` for the whole depth, from
    traces of 2 and 3 decoder layers (a 32-layer model in a tenth of the time).

    Decoder layers are identical, so each layer adds the same tensors: with ``L`` layers the
    activations are ``A(L) = A(3) + (L - 3) (A(3) - A(2))`` exactly, and so is the live total
    at any given moment of a layer's computation. The peak of each phase of the step (the
    forward pass, with the previous step's gradients alive; the backward pass, with the
    activations of the layers not yet reached and the gradients of those done) is therefore
    a line in ``L`` once the moment where it happens is the same for 2 and 3 layers:

        F(L) = F(3) + (L - 3) (F(3) - F(2)),   B(L) = B(3) + (L - 3) (B(3) - B(2)),
        peak = max(F(L), B(L)).

    Splitting the step into its two phases is what keeps the moment fixed (the peak moves
    from the head of the forward pass to the end of the backward pass as models deepen in
    full fine-tuning); tests/test_plan.py compares the result with full traces. Models of at
    most 4 layers are traced whole."""
    layers = getattr(model_config(s.model), "num_hidden_layers", None)
    kwargs = dict(quantization=quantization, checkpointing=checkpointing, world=world)
    if not isinstance(layers, int) or layers <= 4:
        return trace_training_step(s, **kwargs)
    two, three = (_trace(s, layers=n, **kwargs) for n in (2, 3))

    def at_depth(key: str) -> float:
        return three[key] + (layers - 3) * (three[key] - two[key])

    return int(max(at_depth("forward"), at_depth("backward"))), int(at_depth("activations"))


def trace_training_step(s: RunSettings, *, quantization: str = "none", checkpointing: bool = False,
                        world: int = 1) -> tuple[int, int]:
    """``(peak_step, activations)`` in bytes for one device: the highest live total of one
    forward + backward (gradients included, weights and optimizer states excluded), and what
    the forward pass leaves for the backward pass.

    A fresh method is applied to a fresh meta model, whose parameters and buffers are then
    replaced by fake CPU tensors of the planned dtypes; the step runs under ``FakeTensorMode``
    with the precision's autocast, so every kernel's outputs (and autograd's saved tensors)
    have their real shapes and dtypes and no memory is used. The cost is about a thousand
    dispatched ops per decoder layer (:func:`estimate_step` traces three layers instead)."""
    t = _trace(s, quantization=quantization, checkpointing=checkpointing, world=world)
    return int(max(t["forward"], t["backward"])), int(t["activations"])


def _trace(s: RunSettings, *, quantization: str, checkpointing: bool, world: int,
           layers: int | None = None) -> dict[str, float]:
    """One traced step: peaks of the forward and backward phases, activations at the end of
    the forward pass, bytes of gradients (all per device); ``layers``: trace that many
    decoder layers instead of the model's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    precision = str(s.hardware.precision)
    half, mixed = precision_parts(precision)
    loaded = _DTYPES[s.model.dtype]
    sharded = s.hardware.strategy in ("fsdp", "deepspeed") and world > 1
    stage = zero_stage(s.hardware) if world > 1 else 0
    base = _meta_model(s.model, layers)
    quantized = quantized_weights(base) if quantization != "none" else set()
    model = apply_on_meta(_build(s), base, max(1, s.max_steps))
    # Plain tensors a method keeps outside its parameters and buffers (peft's prompt token
    # ids) are CPU tensors, and become fake ones when they meet the fake model.
    fake = FakeTensorMode(allow_non_fake_inputs=True)

    def dtype_of(p: torch.Tensor) -> torch.dtype:
        if not p.is_floating_point():
            return p.dtype
        if sharded and mixed:  # FSDP/DeepSpeed gather half-precision weights for compute
            return half
        if id(p) in quantized:  # bitsandbytes dequantizes to its compute dtype
            return half if (half and not mixed) else loaded
        return param_dtype(precision, loaded, p.requires_grad)

    _to_fake(model, fake, dtype_of)
    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    b, n = s.data.batch_size, s.data.max_length
    tracker = _LiveBytes()
    for t in list(model.parameters()) + list(model.buffers()):
        tracker.track(t, count=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_keys: set[int] = set()
    autocast = torch.autocast("cpu", dtype=half, enabled=bool(mixed and not sharded))
    with fake, tracker.mode:
        ids, mask, labels = _batch(model, s, b, n)
        for p in trainable:  # the previous step's gradients, alive until zero_grad
            p.grad = torch.empty_like(p)
            grad_keys.add(tracker.track(p.grad))
        tracker.mark("forward")
        with autocast:  # the run's loss path: chunked cross-entropy keeps no full logits
            if labels.ndim == 1:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            else:
                total = loss_sum(model, {"input_ids": ids, "attention_mask": mask}, labels,
                                 s.loss.chunk_size, all_scored=True)
                loss = total.total / total.count
        tracker.mark("end_of_forward")
        for p in trainable:
            p.grad = None
        loss.backward()
        del loss
        for p in trainable:
            if p.grad is not None:
                grad_keys.add(tracker.track(p.grad))
    grad_weight = 1 / world if stage >= 2 else 1.0
    peaks, at = tracker.replay({k: grad_weight for k in grad_keys})
    gradients = sum(p.numel() * p.element_size() for p in trainable) * grad_weight
    # The previous step's gradients are alive at the end of the forward pass, not activations.
    return {"forward": peaks["forward"], "backward": peaks["end_of_forward"],
            "activations": max(0.0, at["end_of_forward"] - gradients), "gradients": gradients}


def _meta_model(settings, layers: int | None) -> nn.Module:
    """:func:`~ftlab.models.meta_model`, with only ``layers`` decoder layers if given."""
    if layers is None:
        return meta_model(settings)
    from ftlab.models import loading

    config = model_config(settings)
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    with torch.device("meta"):
        return loading.auto_class(settings).from_config(config)


def _batch(model: nn.Module, s: RunSettings, b: int, n: int):
    """A full batch (no padding): token ids, attention mask and labels of the run's task."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = int(emb.num_embeddings) if emb is not None else 256
    ids = torch.randint(0, vocab, (b, n))
    mask = torch.ones(b, n, dtype=torch.long)
    if getattr(s.model, "task", "causal_lm") == "seq_cls":
        labels = torch.randint(0, int(getattr(model.config, "num_labels", 2) or 2), (b,))
    else:
        labels = ids
    return ids, mask, labels


def _to_fake(model: nn.Module, mode, dtype_of) -> None:
    """Replace every parameter and buffer by a fake CPU tensor of the same shape (tied weights
    stay tied; ``requires_grad`` is kept), and so the meta tensors a method keeps as plain
    attributes (peft's prompt token ids, in a dict per adapter)."""
    done: dict[int, torch.Tensor] = {}

    def fake_of(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in done:
            with mode:
                done[id(t)] = torch.empty(t.shape, dtype=t.dtype, device="cpu")
        return done[id(t)]

    for module in model.modules():
        for key, value in list(vars(module).items()):
            if key.startswith("_"):  # nn.Module's own _parameters, _buffers, hooks...
                continue
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(module, key, fake_of(value))
            elif isinstance(value, dict) and any(isinstance(v, torch.Tensor) and v.is_meta
                                                 for v in value.values()):
                value.update({k: fake_of(v) for k, v in value.items()
                              if isinstance(v, torch.Tensor) and v.is_meta})
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                with mode:
                    t = torch.empty(p.shape, dtype=dtype_of(p), device="cpu")
                done[id(p)] = nn.Parameter(t, requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = fake_of(buf)


# ----------------------------------------------------------------- comparing plans
def summarize(root: Path) -> str:
    """A markdown table of every ``plan.json`` under ``root`` (a sweep directory), in GiB."""
    import json

    rows = []
    for path in Path(root).rglob("plan.json"):
        p = json.loads(path.read_text())
        plain, ckpt = p["memory"]["without_checkpointing"], p["memory"]["with_checkpointing"]
        rows.append((p["method"], p["precision"], p["quantization"], p["trainable_params"],
                     100 * p["trainable_params"] / p["total_params"], plain["weights"] / GIB,
                     (plain["gradients"] + plain["optimizer_states"]) / GIB,
                     plain["activations"] / GIB, plain["peak"] / GIB, ckpt["activations"] / GIB,
                     ckpt["peak"] / GIB))
    lines = ["| method | precision | base | trainable params | % of total | weights | grads + optimizer "
             "| activations | **peak** | activations, grad. ckpt | **peak, grad. ckpt** |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, prec, q, t, share, *gib in sorted(rows):
        lines.append(f"| {m} | {prec} | {q} | {t:,} | {share:.3f} | "
                     + " | ".join(f"{x:.1f}" for x in gib) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m ftlab.plan SWEEP_DIR   (a table of the plan.json files in it)")
    print(summarize(Path(sys.argv[1])))
