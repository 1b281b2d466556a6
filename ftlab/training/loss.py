"""The training and validation loss: summed token cross-entropy, optionally without logits.

Every loss here is a **sum** over scored targets with its count, never a mean, so the caller
can weight by tokens over whatever it averages (the micro-batches of one optimizer step, the
processes, the whole validation set): with ``l_i = -log softmax(z_i)[y_i]`` over the scored
targets ``i`` (label != -100, shifted so that position ``t`` predicts token ``t + 1``),

    loss = sum_i l_i / N,   N = number of scored targets in the step (or the validation set),

the semantics of transformers' ``num_items_in_batch`` (a long example weighs by its tokens).
Classification (one label per example) is the same with one target per example.

Chunked cross-entropy (``loss.chunk_size > 0``)
-----------------------------------------------
The logits of a causal LM are ``z = h W^T + b`` over the vocabulary ``V``: for SmolLM2 at
8 x 240 tokens that is 8 x 240 x 49,152 fp32 values (377 MB) for the logits alone, plus the
log-softmax autograd keeps and the gradient of both. Instead, a forward hook on the model's
output layer (``get_output_embeddings()``) takes its input ``h`` and returns an empty
placeholder, and :class:`ChunkedCrossEntropy` computes, ``chunk_size`` rows of ``h`` at a time,

    forward:   l_i = logsumexp(z_i) - z_i[y_i]                  (keeps only h, W, b, y)
    backward:  dl/dz_i = softmax(z_i) - onehot(y_i)  (recomputed per chunk),
               dh_i = g dl/dz_i W,   dW = g sum_i dl/dz_i^T h_i,   db = g sum_i dl/dz_i,

the same loss and gradients as the plain path, with at most one chunk of logits alive (the
trick of Liger-Kernel's fused linear cross-entropy and of Wijmans et al., "Cut Your Losses in
Large-Vocabulary Language Models", arXiv 2411.09009, here without a fused kernel).

Only an output layer that is exactly ``nn.Linear`` and an architecture that uses its output
unchanged are chunked; a logit soft-cap or scale in the config (Gemma 2, Cohere, Granite), a
wrapped head (LoRA on ``lm_head``, ``modules_to_save``) or a sharded weight use the plain
path, which is always correct. Prompt methods (prompt tuning, p-tuning) return hidden states
for their ``P`` virtual tokens too, in front: the labels get ``P`` leading -100s, as peft's
``PeftModelForCausalLM.forward`` does (so the last virtual token predicts the first label).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ftlab.config import LossSettings
from ftlab.data.encode import IGNORE_INDEX

DEFAULT_CHUNK = LossSettings.chunk_size
# Config keys of architectures that transform the head's output before it is a logit.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class LossSum(NamedTuple):
    """``total``: summed cross-entropy (fp32, differentiable); ``count``: scored targets;
    ``correct``: targets that are the argmax of their logits (only when asked for)."""

    total: torch.Tensor
    count: torch.Tensor
    correct: torch.Tensor | None = None


def loss_sum(model: nn.Module, inputs: dict, labels: torch.Tensor, chunk_size: int = DEFAULT_CHUNK,
             accuracy: bool = False, all_scored: bool = False) -> LossSum:
    """Summed cross-entropy of ``model`` on ``inputs`` (without labels) against ``labels``:
    ``[B]`` one class per example, ``[B, T]`` next-token targets (-100: not scored).
    ``all_scored``: the caller promises every shifted target is scored, so no rows are
    selected (no data-dependent shapes: the planner traces this on fake tensors)."""
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    if labels.ndim == 1:
        logits = model(**inputs).logits
        total = F.cross_entropy(logits.float(), labels, reduction="sum")
        correct = (logits.argmax(-1) == labels).sum() if accuracy else None
        return LossSum(total, torch.tensor(labels.numel(), device=labels.device), correct)
    head = _chunkable_head(model) if chunk_size > 0 else None
    if head is None:
        return _plain(model(**inputs).logits, labels, accuracy)
    with _captured_input(head) as captured:
        model(**inputs)
    hidden, targets = captured[0][:, :-1], _prefixed(labels, captured[0].shape[1])[:, 1:]
    scored = targets != IGNORE_INDEX
    if all_scored:  # all but the virtual tokens' (-100) targets: a slice, not a selection
        start = max(0, captured[0].shape[1] - labels.shape[1] - 1)
        h, y = hidden[:, start:].flatten(0, 1), targets[:, start:].flatten()
    else:
        h, y = hidden[scored], targets[scored]
    weight, bias = head.weight, head.bias
    if weight.ndim != 2 or weight.shape[1] != h.shape[-1]:  # e.g. a flattened, sharded weight
        return _plain(head(captured[0]), labels, accuracy)
    total = ChunkedCrossEntropy.apply(h, weight, bias, y, chunk_size)
    correct = None
    if accuracy:
        with torch.no_grad():
            correct = sum((_chunk_logits(h[s:s + chunk_size], weight, bias).argmax(-1) == y[s:s + chunk_size]).sum()
                          for s in range(0, len(y), chunk_size))
            correct = torch.as_tensor(correct, device=y.device)
    return LossSum(total, scored.sum(), correct)


def _plain(logits: torch.Tensor, labels: torch.Tensor, accuracy: bool) -> LossSum:
    """The reference: all logits at once, shifted so that tokens < n predict token n."""
    logits, targets = logits[:, :-1], _prefixed(labels, logits.shape[1])[:, 1:]
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    scored = targets != IGNORE_INDEX
    correct = ((logits.argmax(-1) == targets) & scored).sum() if accuracy else None
    return LossSum(total, scored.sum(), correct)


def _prefixed(labels: torch.Tensor, positions: int) -> torch.Tensor:
    """``labels`` [B, T] with -100 in front for the ``positions - T`` virtual tokens."""
    extra = positions - labels.shape[1]
    if extra <= 0:
        return labels
    return F.pad(labels, (extra, 0), value=IGNORE_INDEX)


def _chunkable_head(model: nn.Module) -> nn.Linear | None:
    """The model's output layer if the chunked path computes exactly what it does, else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear:  # a subclass or wrapper may compute something else
        return None
    config = getattr(model, "config", None)
    for key in _LOGIT_TRANSFORMS:
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0):
            return None
    return head


@contextlib.contextmanager
def _captured_input(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While open, ``head`` records its input and returns an empty placeholder (no logits)."""
    captured: list[torch.Tensor] = []

    def capture(hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        captured.append(hidden)
        return hidden.new_empty(*hidden.shape[:-1], 0)

    previous = head.__dict__.get("forward")  # accelerate's hooks set one of their own
    head.forward = capture  # an instance attribute shadows the class's forward
    try:
        yield captured
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous
    if len(captured) != 1:
        raise RuntimeError(f"the output layer ran {len(captured)} times in one forward pass")


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """fp32 logits of one chunk, from a matmul in ``dtype`` (None: as autocast or the inputs decide)."""
    if dtype is not None:
        h, weight = h.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return F.linear(h, weight, bias).float()


# In place: one chunk of logits is the only [chunk x vocabulary] tensor alive (torch.logsumexp and
# torch.softmax allocate another, and ``p * g`` a third), at the step's peak of memory, where every
# activation is still held for backward.
def _logsumexp_(z: torch.Tensor) -> torch.Tensor:
    """``logsumexp(z, -1)``; overwrites ``z`` (fp32 logits nobody else holds)."""
    top = z.amax(-1, keepdim=True)
    top.masked_fill_(~torch.isfinite(top), 0.0)
    return z.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))


def _softmax_(z: torch.Tensor) -> torch.Tensor:
    """``softmax(z, -1)`` computed in ``z``'s own memory."""
    top = z.amax(-1, keepdim=True)
    top.masked_fill_(~torch.isfinite(top), 0.0)
    z.sub_(top).exp_()
    return z.div_(z.sum(-1, keepdim=True))


class ChunkedCrossEntropy(torch.autograd.Function):
    """``sum_i logsumexp(h_i W^T + b) - (h_i W^T + b)[y_i]`` over rows ``h`` [n, H] with targets
    ``y`` [n] (all scored), ``chunk`` rows at a time in both passes (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dtype = hidden.dtype
        for s in range(0, hidden.shape[0], chunk):
            z = F.linear(hidden[s:s + chunk], weight, bias)
            dtype = z.dtype  # the matmul's dtype (autocast's), recomputed alike in backward
            z = z.float()
            picked = z.gather(1, targets[s:s + chunk, None]).squeeze(1)
            total += (_logsumexp_(z) - picked).sum()
            del z
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk, ctx.dtype = chunk, dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, targets = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        w = weight.to(dtype)
        rows = torch.arange(min(chunk, hidden.shape[0]), device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            p = _softmax_(_chunk_logits(h, w, bias, dtype))
            p[rows[:h.shape[0]], targets[s:s + chunk]] -= 1
            g = p.mul_(grad_total).to(dtype)
            del p
            if need_h:
                grad_h[s:s + chunk] = g @ w
            if need_w:
                grad_w += (g.t() @ h.to(dtype)).float()
            if need_b:
                grad_b += g.float().sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None)
