"""Every registered method (and native backend) on tiny random models of four architecture
families, checked the same way:

- Llama: a decoder with nn.Linear projections and grouped-query attention (causal LM);
- GPT-2: a decoder whose projections are transformers' Conv1D (weights stored (in, out), the
  fused query/key/value ``c_attn``), head tied to the embeddings (causal LM);
- BERT: an encoder with a new sequence-classification head (``task: seq_cls``, 2 labels);
- Falcon: a decoder with one fused ``query_key_value`` layer (FalconLinear) and multi-query
  attention (4 query heads share one key/value head, so prefix tuning's prefixes have one
  head), attention and MLP in parallel, head tied to the embeddings (causal LM).

For each (family, method):

1. the trainable parameter count equals the method's formula, written out here per method
   from its math and the family's shapes (plus the classification head, which every method
   trains on a ``seq_cls`` model);
2. frozen weights (and buffers) are bit-identical after optimizer steps;
3. it overfits a fixed batch: the loss halves within a bounded number of steps;
4. save, then load onto a fresh base model, gives the same outputs;
5. where the method merges, merged outputs equal unmerged ones.

A pair that cannot work (peft's LoHa and LoKr cannot wrap GPT-2's Conv1D) is listed in
NOT_APPLICABLE with the layer type, and must be refused by ``method.check`` with a
ConfigError naming it, before any weight loads. A method registered without a formula here
fails (1): add its formula when adding a method.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from torch import nn

from ftlab.errors import ConfigError
from ftlab.methods import count_parameters
from ftlab.models import meta_model

from .tiny import BERT, FALCON, FAMILIES, GPT2, LLAMA, Family, build, cases, method_kwargs

CASES = cases()
CASE_IDS = [c[0] for c in CASES]

# (family, case) -> the layer type the method cannot adapt (must appear in check()'s error).
NOT_APPLICABLE: dict[tuple[str, str], str] = {
    ("gpt2", "loha"): "Conv1D",  # peft's LoHa wraps nn.Linear / nn.Conv1d / nn.Conv2d only
    ("gpt2", "lokr"): "Conv1D",  # likewise LoKr
}
MATRIX = [(family, *case) for family in FAMILIES.values() for case in CASES
          if (family.name, case[0]) not in NOT_APPLICABLE]
MATRIX_IDS = [f"{family.name}-{case}" for family, case, _, _ in MATRIX]

# Steps to halve the loss, at most. Each case stops as soon as it has (after 3 steps).
MAX_STEPS = {"llama": 60, "gpt2": 60, "bert": 30, "falcon": 60}
LR = {"full": 3e-3, "lora_plus": 1e-2, "adapter": 1e-2}  # by case or method name; others: DEFAULT_LR
DEFAULT_LR = 3e-2


# ------------------------------------------------------------------------------ the families
@dataclass(frozen=True)
class Dims:
    """What the formulas need of an architecture: model width, layers, the width of one
    layer's keys (= of its values), and the classification head (module, has a bias)."""

    d: int
    layers: int
    kv: int
    head: tuple[str, bool]


def dims(family: Family) -> Dims:
    a = family.arch
    if family is LLAMA:
        # Grouped-query attention: kv heads of width hidden / heads each.
        return Dims(a["hidden_size"], a["num_hidden_layers"],
                    a["hidden_size"] // a["num_attention_heads"] * a["num_key_value_heads"], ("score", False))
    if family is GPT2:
        return Dims(a["n_embd"], a["n_layer"], a["n_embd"], ("score", False))  # one kv head per head
    if family is BERT:
        return Dims(a["hidden_size"], a["num_hidden_layers"], a["hidden_size"], ("classifier", True))
    if family is FALCON:
        # Multi-query attention: one key/value head of width hidden / heads.
        return Dims(a["hidden_size"], a["num_hidden_layers"], a["hidden_size"] // a["num_attention_heads"],
                    ("score", False))
    raise AssertionError(f"no dimensions for family {family.name!r}")


# Full module paths (regular expressions) per family. (IA)^3 with target_modules=auto takes
# peft's per-architecture defaults: the key and value projections have their outputs scaled,
# the feed-forward output projection its input. On BERT peft's defaults name "output.dense",
# which by peft's suffix rule also selects each layer's attention.output.dense: it is scaled
# on its input too.
IA3_AUTO: dict[str, tuple[list[str], list[str]]] = {
    "llama": ([r".*\.self_attn\.k_proj", r".*\.self_attn\.v_proj"], [r".*\.mlp\.down_proj"]),
    "gpt2": ([r".*\.attn\.c_attn"], [r".*\.mlp\.c_proj"]),
    "bert": ([r".*\.attention\.self\.key", r".*\.attention\.self\.value"],
             [r".*\.layer\.\d+\.output\.dense", r".*\.attention\.output\.dense"]),
    # peft's Falcon defaults: the fused query_key_value (keys and values scaled with the
    # queries: one vector over all 64 + 2 x 16 outputs) and the MLP's dense_4h_to_h on its input.
    "falcon": ([r".*\.self_attention\.query_key_value"], [r".*\.mlp\.dense_4h_to_h"]),
}
# Houlsby adapters sit after the attention output projection and after the feed-forward
# output projection of every layer.
ADAPTER_AUTO: dict[str, list[str]] = {
    "llama": [r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj"],
    "gpt2": [r".*\.attn\.c_proj", r".*\.mlp\.c_proj"],
    "bert": [r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"],
    "falcon": [r".*\.self_attention\.dense", r".*\.mlp\.dense_4h_to_h"],
}


# ------------------------------------------------------------------------------ formulas
Shapes = dict[str, tuple[int, int]]  # module path -> (in, out) of the base model's linear layers
OUTPUT_HEADS = ("lm_head", "score", "classifier")  # never adapted: not in Shapes


@dataclass(frozen=True)
class Ctx:
    shapes: Shapes
    total: int  # every parameter of the base model
    dims: Dims
    family: str


def layer_shapes(model: nn.Module) -> Shapes:
    """(in, out) of every nn.Linear and transformers Conv1D (weight stored (in, out), as
    ``x @ W + b``) but the output heads."""
    from transformers.pytorch_utils import Conv1D

    shapes = {}
    for name, m in model.named_modules():
        if name in OUTPUT_HEADS:
            continue
        if isinstance(m, Conv1D):
            shapes[name] = tuple(m.weight.shape)
        elif isinstance(m, nn.Linear):
            shapes[name] = (m.in_features, m.out_features)
    return shapes


def adapted(kw: dict[str, Any], ctx: Ctx, targets=None) -> list[tuple[int, int]]:
    """(in, out) of every layer the targets select (peft's rule: the path or a dotted suffix)."""
    targets = kw.get("target_modules") if targets is None else targets
    if targets == "all-linear":
        return list(ctx.shapes.values())
    return [io for path, io in ctx.shapes.items()
            if any(path == t or path.endswith("." + t) for t in targets)]


def selected(ctx: Ctx, patterns: list[str]) -> list[tuple[int, int]]:
    return [io for path, io in ctx.shapes.items() if any(re.fullmatch(p, path) for p in patterns)]


def near_sqrt_factors(n: int) -> tuple[int, int]:
    """(a, b), a <= b, a * b = n, a the largest divisor of n not above sqrt(n)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def lokr_params(i: int, o: int, r: int) -> int:
    """W1 (a x c, full) kron W2 (b x d), W2 full when r >= max(b, d) / 2 else W2a (b x r) W2b (r x d),
    with out = a * b and in = c * d factored near their square roots (peft's defaults)."""
    (a, b), (c, d) = near_sqrt_factors(o), near_sqrt_factors(i)
    w2 = b * d if r >= max(b, d) / 2 else r * (b + d)
    return a * c + w2


def lstm_encoder(d: int, h: int, layers: int) -> int:
    """A bidirectional LSTM (input d, hidden h per direction) and the MLP 2h -> 2h -> d."""
    lstm = sum(2 * (4 * h * (d if layer == 0 else 2 * h) + 4 * h * h + 8 * h) for layer in range(layers))
    return lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


def p_tuning_params(kw, ctx: Ctx) -> int:
    d = ctx.dims.d
    k, h = kw["num_virtual_tokens"], kw["encoder_hidden_size"] or d
    if kw["encoder"] == "lstm":
        return k * d + lstm_encoder(d, h, kw["encoder_num_layers"])
    return k * d + (d * h + h) + (h * h + h) + (h * d + d)


def prefix_params(kw, ctx: Ctx) -> int:
    kv = ctx.dims.kv
    k, width = kw["num_virtual_tokens"], ctx.dims.layers * 2 * kv  # keys and values of every layer
    if not kw["projection"]:
        return k * width
    h = kw["encoder_hidden_size"] or kv
    return k * kv + (kv * h + h) + (h * width + width)


def lora(kw, ctx: Ctx) -> int:
    return sum(kw["r"] * (i + o) for i, o in adapted(kw, ctx))


def ia3(kw, ctx: Ctx) -> int:
    """A vector over the output of each scaled projection, over the input of each feed-forward one."""
    if kw["target_modules"] == "auto":
        outputs, inputs = IA3_AUTO[ctx.family]
        scaled_outputs, scaled_inputs = selected(ctx, outputs), selected(ctx, inputs)
    else:
        feedforward = kw["feedforward_modules"]
        scaled_outputs = adapted(kw, ctx, [t for t in kw["target_modules"] if t not in feedforward])
        scaled_inputs = adapted(kw, ctx, feedforward)
    return sum(o for _, o in scaled_outputs) + sum(i for i, _ in scaled_inputs)


def adapter(kw, ctx: Ctx) -> int:
    """Per placement (output width d): down d -> m and up m -> d, with biases."""
    m = kw["bottleneck"]
    layers = selected(ctx, ADAPTER_AUTO[ctx.family]) if kw["target_modules"] == "auto" else adapted(kw, ctx)
    return sum(d * m + m + m * d + d for _, d in layers)


FORMULAS: dict[str, Callable[[dict, Ctx], int]] = {
    "lora": lora,
    "lora[native]": lora,
    "lora_plus": lora,
    "qlora": lora,
    "pissa": lora,
    "delta_lora": lora,  # A and B train; W moves without being a parameter of the optimizer
    "lora_fa": lambda kw, c: sum(kw["r"] * o for _, o in adapted(kw, c)),  # only B
    "dora": lambda kw, c: sum(kw["r"] * (i + o) + o for i, o in adapted(kw, c)),  # + magnitude m
    "vera": lambda kw, c: sum(o + kw["r"] for _, o in adapted(kw, c)),  # b and d
    "vera[native]": lambda kw, c: sum(o + kw["r"] for _, o in adapted(kw, c)),
    "adalora": lambda kw, c: sum(kw["init_r"] * (i + o + 1) for i, o in adapted(kw, c)),  # P, Q, lambda
    "ia3": ia3,
    "loha": lambda kw, c: sum(2 * kw["r"] * (i + o) for i, o in adapted(kw, c)),
    "lokr": lambda kw, c: sum(lokr_params(i, o, kw["r"]) for i, o in adapted(kw, c)),
    "prompt_tuning": lambda kw, c: kw["num_virtual_tokens"] * c.dims.d,
    "p_tuning": p_tuning_params,
    "prefix_tuning": prefix_params,
    "adapter": adapter,
    "full": lambda kw, c: c.total,
}


def head_params(family: Family, ctx: Ctx) -> int:
    """The new classification head of a seq_cls model (d -> labels), which every method trains."""
    if family.task != "seq_cls":
        return 0
    _, bias = ctx.dims.head
    n = len(family.labels)
    return ctx.dims.d * n + (n if bias else 0)


# Methods whose frozen weights legitimately change.
MOVES_FROZEN = {
    "full": "every weight trains",
    "delta_lora": "W moves by lambda * s * delta(B A) after step K (tests/methods/test_delta_lora.py covers the rule)",
}


# ------------------------------------------------------------------------------ training
@dataclass
class Trained:
    family: Family
    case: str
    name: str
    overrides: dict[str, Any]
    kwargs: dict[str, Any]
    method: Any
    model: nn.Module
    ctx: Ctx
    frozen_before: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    state.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return state


def make_optimizer(method, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    optimizer = method.build_optimizer(model, lr, 0.0)  # as FinetuneModule does
    return optimizer or torch.optim.AdamW(method.param_groups(model, lr, 0.0))


def base_model(method, family: Family) -> nn.Module:
    return family.load(method.traits.base_quantization or "none", seed=0)


@pytest.fixture(scope="module", params=MATRIX, ids=MATRIX_IDS)
def trained(request) -> Trained:
    family, case, name, overrides = request.param
    kwargs = method_kwargs(name, family=family, **overrides)
    method = build(name, family=family, **overrides)
    meta = meta_model(family.settings())
    method.check(meta)
    base = base_model(method, family)
    # Shapes from the unquantized architecture: a 4-bit layer stores its weight packed.
    ctx = Ctx(layer_shapes(meta), count_parameters(base)[1], dims(family), family.name)
    max_steps = MAX_STEPS[family.name]
    torch.manual_seed(0)
    model = method.apply(base, max_steps)
    t = Trained(family, case, name, overrides, kwargs, method, model, ctx, frozen_state(model))
    optimizer = make_optimizer(method, model, LR.get(case, LR.get(name, DEFAULT_LR)))
    batch = family.batch()
    model.train()
    for step in range(1, max_steps + 1):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(model, step, max_steps)
        optimizer.zero_grad()
        t.losses.append(loss.item())
        if step >= 3 and t.losses[-1] <= t.losses[0] / 2:
            break
    return t


@torch.no_grad()
def logits(model: nn.Module, family: Family) -> torch.Tensor:
    model.eval()
    batch = family.batch()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ------------------------------------------------------------------------------ the matrix
def test_trainable_count_matches_the_formula(trained):
    if trained.case not in FORMULAS:
        pytest.fail(f"no trainable-parameter formula for method {trained.case!r}: add one to FORMULAS")
    expected = FORMULAS[trained.case](trained.kwargs, trained.ctx)
    if trained.name != "full":  # full already counts the head among all the weights
        expected += head_params(trained.family, trained.ctx)
    trainable, _ = count_parameters(trained.model)
    assert trainable == expected


def test_frozen_weights_stay_bit_identical(trained):
    if trained.case in MOVES_FROZEN:
        pytest.skip(MOVES_FROZEN[trained.case])
    after = frozen_state(trained.model)
    assert after.keys() == trained.frozen_before.keys()
    moved = [k for k, v in trained.frozen_before.items() if not torch.equal(v, after[k])]
    assert not moved, moved[:5]
    assert len(trained.losses) >= 3  # steps were taken


def test_overfits_a_fixed_batch(trained):
    first, best = trained.losses[0], min(trained.losses)
    assert best <= first / 2, f"loss {first:.3f} -> {best:.3f} in {len(trained.losses)} steps"


def test_save_then_load_on_a_fresh_base_gives_the_same_outputs(trained, tmp_path):
    expected = logits(trained.model, trained.family)
    trained.method.save(trained.model, tmp_path)
    fresh_method = build(trained.name, family=trained.family, **trained.overrides)
    loaded = fresh_method.load(base_model(fresh_method, trained.family), tmp_path)
    # PiSSA is saved as an equivalent LoRA over the original W0: equal up to float rounding.
    torch.testing.assert_close(logits(loaded, trained.family), expected, rtol=0,
                               atol=1e-4 if trained.name == "pissa" else 1e-5)


def test_merged_outputs_equal_unmerged(trained):
    """Every method that declares itself mergeable (``Method.traits``) merges exactly."""
    traits = trained.method.traits
    if not traits.mergeable:
        pytest.skip(traits.merge_note)
    if traits.artifact_format == "model":
        pytest.skip("there is no adapter: the weights themselves trained")
    if traits.base_quantization:
        pytest.skip("merging into an NF4 base re-quantizes W0 + s B A (export dequantizes first; "
                    "tests/test_export.py checks that path)")
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = copy.deepcopy(trained.model)
    expected = logits(model, trained.family)
    if isinstance(model, PeftModel):
        merged = model.merge_and_unload()
        assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    else:
        layers = [m for m in model.modules() if callable(getattr(m, "merge", None)) and m is not model]
        assert layers, "no layer with merge()"
        for layer in layers:
            layer.merge()
        merged = model
    torch.testing.assert_close(logits(merged, trained.family), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ not applicable
@pytest.mark.parametrize("family, case", list(NOT_APPLICABLE), ids=[f"{f}-{c}" for f, c in NOT_APPLICABLE])
def test_not_applicable_pairs_are_refused_before_loading(family, case):
    """A method that cannot adapt a family's layers says so in check(), on the meta model,
    naming the layer type, instead of failing inside peft after the weights loaded."""
    assert case in CASE_IDS, f"NOT_APPLICABLE names {case!r}, which is no case of the matrix"
    _, name, overrides = CASES[CASE_IDS.index(case)]
    with pytest.raises(ConfigError, match=re.escape(NOT_APPLICABLE[family, case])):
        build(name, family=FAMILIES[family], **overrides).check(meta_model(FAMILIES[family].settings()))


# ------------------------------------------------------------------------------ chunked loss
LM_MATRIX = [m for m in MATRIX if m[0].task == "causal_lm"]


@pytest.mark.parametrize("family, case, name, overrides", LM_MATRIX,
                         ids=[f"{f.name}-{c}" for f, c, _, _ in LM_MATRIX])
def test_chunked_loss_and_gradients_equal_the_models_own(family, case, name, overrides):
    """Every method on every causal-LM family: ftlab's chunked cross-entropy (chunks of 7
    scored tokens) against the model's own loss given labels, and their gradients. The same
    seed before each forward pass gives both the same dropout masks. AdaLoRA's forward adds
    its penalty to its own loss only, so it is added to the chunked one here."""
    from ftlab.training.loss import loss_sum

    method = build(name, family=family, **overrides)
    torch.manual_seed(0)
    model = method.apply(base_model(method, family), 10)
    model.train()
    batch = family.batch(rows=2, length=12)
    batch["labels"][0, :4] = -100  # a masked prompt
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in trainable if p.grad is not None}

    torch.manual_seed(1)
    reference = model(**batch).loss
    ref_grads = grads(reference)
    torch.manual_seed(1)
    s = loss_sum(model, {k: v for k, v in batch.items() if k != "labels"}, batch["labels"], chunk_size=7)
    loss = s.total / s.count
    penalty = method.regularizer(model)
    if penalty is not None:
        loss = loss + penalty
    got = grads(loss)
    assert float(loss) == pytest.approx(float(reference), abs=1e-5)
    assert got.keys() == ref_grads.keys() and got
    for n, g in ref_grads.items():
        torch.testing.assert_close(got[n], g, atol=1e-5, rtol=1e-5, msg=n)
