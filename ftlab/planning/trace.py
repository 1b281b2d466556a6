"""Peak training memory of one step, traced on fake tensors (no weights, no memory used).

The loss is the run's own (:func:`ftlab.training.loss.loss_sum`): with ``loss.chunk_size > 0``
no ``[tokens x vocabulary]`` logits are kept for backward, and only one chunk's are live
during the loss.

:func:`trace_training_step` runs one forward and backward pass of the planned model under
``FakeTensorMode`` and counts every tensor storage as it is allocated and freed;
:func:`estimate_step` extrapolates from 2 and 3 decoder layers to the model's depth. The
memory model around it is in :mod:`ftlab.planning.planner`.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ftlab.config import RunSettings
from ftlab.methods import method_from_spec
from ftlab.models.loading import _DTYPES, meta_model, model_config
from ftlab.training.loss import loss_sum
from ftlab.training.hardware import enable_gradient_checkpointing, param_dtype, precision_parts, zero_stage

GIB = 2**30


def apply_on_meta(method, base: nn.Module, steps: int) -> nn.Module:
    """``method.apply`` with new tensors on the meta device too: a method that creates its
    modules on the default device (peft's prompt encoders) allocates nothing."""
    with torch.device("meta"):
        return method.apply(base, steps)


def quantized_weights(model: nn.Module) -> set[int]:
    """``id`` of the weights bitsandbytes would quantize: every plain ``nn.Linear`` except the
    output head (transformers keeps ``lm_head`` and tied embeddings in the compute dtype)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return {id(m.weight) for m in model.modules()
            if type(m) is nn.Linear and m is not head and id(m.weight) not in tied}


def size_of(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


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
    model = apply_on_meta(method_from_spec(s.method), base, max(1, s.max_steps))
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
    from ftlab.models.loading import auto_class

    config = model_config(settings)
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    with torch.device("meta"):
        return auto_class(settings).from_config(config)


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


