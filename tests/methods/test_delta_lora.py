"""Delta-LoRA: W follows lambda * s * (B'A' - BA) after step K, checked step by step by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from ftlab.errors import ConfigError
from ftlab.methods import build_method, count_parameters
from ftlab.methods.native.lora import lora_layers

from .tiny import plain_batch, plain_model

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
R, ALPHA, LAM, K, STEPS = 4, 8, 2.0, 2, 7


def method(arch: str, **kw):
    args = {"r": R, "alpha": ALPHA, "update_ratio": LAM, "start_step": K, "target_modules": TARGETS[arch]} | kw
    return build_method("delta_lora", **args)


def train_by_hand(m, model, steps: int):
    """A plain torch loop; returns per-step snapshots of W and of the (A, B) factors."""
    optimizer = torch.optim.AdamW(m.param_groups(model, lr=5e-2, weight_decay=0.01))
    layers = lora_layers(model)
    frozen = {id(layer.base_layer.weight) for layer in layers.values()}
    assert not any(id(p) in frozen for g in optimizer.param_groups for p in g["params"])
    factors = [{n: (layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone())
                for n, layer in layers.items()}]
    weights = [{n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}]
    b = plain_batch()
    for step in range(1, steps + 1):
        model(**b).loss.backward()
        assert all(layer.base_layer.weight.grad is None for layer in layers.values())
        optimizer.step()
        optimizer.zero_grad()
        m.after_optimizer_step(model, step, steps)
        factors.append({n: (layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone())
                        for n, layer in layers.items()})
        weights.append({n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()})
    assert not optimizer.state_dict()["state"].keys() - set(range(2 * len(layers)))  # no state for W
    return factors, weights


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_W_follows_the_paper_update_step_by_step(arch):
    m = method(arch)
    model = m.apply(plain_model(arch), STEPS)
    factors, weights = train_by_hand(m, model, STEPS)
    s = ALPHA / R
    expected = copy.deepcopy(weights[0])
    for step in range(1, STEPS + 1):
        t = step - 1  # the paper's 0-based iteration index
        for name in expected:
            (a_new, b_new), (a_old, b_old) = factors[step][name], factors[step - 1][name]
            if t > K:
                delta = b_new @ a_new - b_old @ a_old
                expected[name] = expected[name] + LAM * s * (delta.T if arch == "gpt2" else delta)
                assert not torch.equal(weights[step][name], weights[step - 1][name])
            else:  # at and before K (and at K + 1, the paper's t = K) W does not move
                assert torch.equal(weights[step][name], weights[0][name])
            torch.testing.assert_close(weights[step][name], expected[name], atol=1e-6, rtol=0)
    # The updates telescope: W_T = W0 + lambda s (B_T A_T - B_K' A_K'), K' = K + 1 steps done.
    for name, w in weights[-1].items():
        (a_t, b_t), (a_k, b_k) = factors[-1][name], factors[K + 1][name]
        closed = b_t @ a_t - b_k @ a_k
        torch.testing.assert_close(w, weights[0][name] + LAM * s * (closed.T if arch == "gpt2" else closed),
                                   atol=1e-6, rtol=0)


def test_only_A_B_train_and_nothing_else_moves():
    base = plain_model("llama")
    m = method("llama")
    model = m.apply(copy.deepcopy(base), STEPS)
    layers = lora_layers(model)
    assert count_parameters(model)[0] == sum(R * (layer.in_features + layer.out_features) for layer in layers.values())
    assert all(isinstance(layer.lora_dropout, torch.nn.Identity) for layer in layers.values())  # no dropout
    assert m.state_dict()["step"] == 0
    assert not [k for k in model.state_dict() if "delta_lora_base" in k]  # W0 is no checkpoint tensor
    train_by_hand(m, model, STEPS)
    moved = {f"{n}.base_layer.weight" for n in layers}
    original = dict(base.named_parameters())
    for name, p in model.named_parameters():
        if ".lora_" in name or name in moved:
            continue
        torch.testing.assert_close(p, original[name], atol=0, rtol=0)


def test_zero_update_ratio_is_plain_lora():
    m = method("llama", update_ratio=0)
    model = m.apply(plain_model("llama"), STEPS)
    _, weights = train_by_hand(m, model, STEPS)
    assert all(torch.equal(weights[-1][n], weights[0][n]) for n in weights[0])
    assert m.state_dict()["anchor"] == {}  # W never starts to move


def test_state_dict_restores_W_on_a_fresh_base():
    base = plain_model("llama")
    m = method("llama")
    model = m.apply(copy.deepcopy(base), STEPS)
    train_by_hand(m, model, STEPS)
    state = m.state_dict()
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    # What a checkpoint restore does: fresh base + apply, method state, then trainable params.
    m2 = method("llama")
    model2 = m2.apply(copy.deepcopy(base), STEPS)
    m2.load_state_dict(state)
    model2.load_state_dict(trainable, strict=False)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(lora_layers(model2)[name].base_layer.weight, layer.base_layer.weight,
                                   atol=1e-6, rtol=0)
    b = plain_batch()
    with torch.no_grad():
        torch.testing.assert_close(model2(**b).logits, model(**b).logits, atol=1e-5, rtol=0)
    assert m2.step == STEPS


@pytest.mark.parametrize("steps", [K, STEPS])  # before W moves: rank r; after: rank 2r
def test_save_is_a_peft_lora_adapter_of_the_whole_change(steps, tmp_path):
    base = plain_model("llama")
    m = method("llama")
    model = m.apply(copy.deepcopy(base), steps)
    train_by_hand(m, model, steps)
    b = plain_batch()
    with torch.no_grad():
        expected = model(**b).logits
    m.save(model, tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))  # plain peft, original W0
    assert loaded.peft_config["default"].r == (2 * R if steps > K + 1 else R)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b).logits, expected, atol=1e-5, rtol=0)

    m2 = method("llama", start_step=0, update_ratio=1.0)  # load adopts the saved settings
    model2 = m2.load(copy.deepcopy(base), tmp_path)
    assert (m2.update_ratio, m2.start_step, m2.step) == (LAM, K, steps)
    with torch.no_grad():
        torch.testing.assert_close(model2(**b).logits, expected, atol=1e-5, rtol=0)
    for name, layer in lora_layers(model).items():
        other = lora_layers(model2)[name]
        torch.testing.assert_close(other.base_layer.weight, layer.base_layer.weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(other.lora_B.weight, layer.lora_B.weight, atol=1e-6, rtol=1e-6)


def test_bad_settings_are_config_errors():
    for key, value in [("update_ratio", -1.0), ("start_step", -1), ("start_step", 1.5), ("r", 0), ("alpha", 0)]:
        with pytest.raises(ConfigError, match=f"method.{key}"):
            build_method("delta_lora", **{key: value})
    with pytest.raises(ConfigError, match="method.dropout is not a setting"):
        build_method("delta_lora", dropout=0.1)  # the paper removes dropout on the branch


class OneLayer(torch.nn.Module):
    """A lone bf16 ``q_proj`` (256 x 256, values N(0, 0.02) like a pretrained weight)."""

    def __init__(self, dtype=torch.bfloat16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q_proj = torch.nn.Linear(256, 256, bias=False)
        with torch.no_grad():
            self.q_proj.weight.copy_(torch.randn(256, 256, generator=g) * 0.02)
        self.to(dtype)

    def prepare_inputs_for_generation(self, *args, **kwargs):  # PeftModelForCausalLM looks it up
        raise NotImplementedError


def bf16_half_ulp(x: torch.Tensor) -> torch.Tensor:
    """Half the spacing of bf16 numbers around |x| (8 significant bits): one rounding's error."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0 ** -126)))
    return 2.0 ** (exponent - 8)


def small_steps(m, model, steps: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """``steps`` optimizer-like moves of A and B of about 2e-4 each (Adam at lr 2e-4), each
    followed by the Delta-LoRA update; returns W0 + sum of the rule's deltas, in float64."""
    g = torch.Generator().manual_seed(seed)
    layer = lora_layers(model)["q_proj"]
    expected = layer.base_layer.weight.detach().double().clone()
    s = m.alpha / m.r
    for step in range(1, steps + 1):
        old = layer.lora_B.weight.detach().double() @ layer.lora_A.weight.detach().double()
        with torch.no_grad():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.add_(torch.randn(p.shape, generator=g) * 2e-4)
        m.after_optimizer_step(model, step, steps)
        new = layer.lora_B.weight.detach().double() @ layer.lora_A.weight.detach().double()
        if step - 1 > m.start_step:
            expected += m.update_ratio * s * (new - old)
    return {"q_proj": expected}


def test_W_follows_the_rule_on_a_bf16_base_within_one_rounding(tmp_path):
    """Per-step deltas of order lr * |B| * |A| are far below bf16's resolution (2^-9 relative):
    added to the bf16 weight one by one they round away. W must be round_bf16(W0 + D), with D
    the sum of the deltas in full precision: off by at most one rounding (half a bf16 ulp)."""
    m = build_method("delta_lora", r=8, alpha=16, update_ratio=2.0, start_step=0, target_modules=["q_proj"])
    base = OneLayer()
    model = m.apply(copy.deepcopy(base), 50)
    expected = small_steps(m, model, 50)["q_proj"]
    w = lora_layers(model)["q_proj"].base_layer.weight
    assert w.dtype == torch.bfloat16
    error = (w.double() - expected).abs()
    assert (error <= bf16_half_ulp(expected) * (1 + 1e-3) + 1e-12).all(), error.max()
    w0 = base.q_proj.weight.double()
    moved = (expected - w0).abs() > bf16_half_ulp(w0)  # where the rule moves W by more than a rounding
    assert moved.any() and (w.double() != w0)[moved].all()

    # The checkpointed method state restores the same W, bit for bit, on a fresh base.
    m2 = build_method("delta_lora", r=8, alpha=16, update_ratio=2.0, start_step=0, target_modules=["q_proj"])
    model2 = m2.apply(copy.deepcopy(base), 50)
    m2.load_state_dict(m.state_dict())
    model2.load_state_dict({n: p for n, p in model.state_dict().items() if ".lora_" in n}, strict=False)
    assert torch.equal(lora_layers(model2)["q_proj"].base_layer.weight, w)

    # The export is W0 + D exactly (an fp32 LoRA over the bf16 base): within one rounding of the
    # trained W, and ftlab's own load gives the trained W bit for bit.
    m.save(model, tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    peft_layer = peft_model.base_model.model.q_proj
    lora = lora_layers(model)["q_proj"]
    exported = base.q_proj.weight.double() + peft_layer.get_delta_weight("default").double()
    trained = w.double() + lora.get_delta_weight().double()
    assert ((exported - trained).abs() <= bf16_half_ulp(expected) * (1 + 1e-3) + 1e-6).all()
    m3 = build_method("delta_lora", target_modules=["q_proj"])
    loaded = lora_layers(m3.load(copy.deepcopy(base), tmp_path))["q_proj"]
    assert torch.equal(loaded.base_layer.weight, w)


def test_saved_metadata_and_the_refusals_of_save_and_load(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base = plain_model("llama")
    m = method("llama")
    model = m.apply(copy.deepcopy(base), STEPS)
    train_by_hand(m, model, STEPS)
    m.save(model, tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta == {"format": "pt", "ftlab_method": "delta_lora", "r": "4", "alpha": "8.0", "update_ratio": "2.0",
                    "start_step": "2", "step": "7"}
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    # the whole change at rank 2r: B' = [(1 + lam) B, -lam B0], alpha scaled alike so that s stays alpha / r
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"]) == (8, 16.0, 0.0, False)

    with torch.no_grad():  # A moved after the last after_optimizer_step: the saved W would be stale
        next(iter(lora_layers(model).values())).lora_A.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="^Delta-LoRA save: A, B changed since the last after_optimizer_step$"):
        m.save(model, tmp_path / "b")

    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="was not written by Delta-LoRA"):
        method("llama").load(copy.deepcopy(base), tmp_path / "a")
    extra = {**tensors, "base_model.model.model.extra.weight": torch.zeros(1)}
    save_file(extra, str(tmp_path / "a" / "adapter_model.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"tensors with no place in this model: \['base_model.model.model.extra"):
        method("llama").load(copy.deepcopy(base), tmp_path / "a")


def test_no_state_is_no_change_and_state_before_apply_waits_for_it():
    base = plain_model("llama")
    m = method("llama")
    model = m.apply(copy.deepcopy(base), STEPS)
    train_by_hand(m, model, STEPS)
    state = m.state_dict()
    assert state["step"] == STEPS and set(state["prev"]) == set(state["anchor"]) == set(lora_layers(model))
    m.load_state_dict({})  # nothing saved: nothing changes
    assert m.step == STEPS
    early = method("llama")
    early.load_state_dict(state)  # before apply: kept until the layers exist
    model2 = early.apply(copy.deepcopy(base), STEPS)
    model2.load_state_dict({n: p for n, p in model.named_parameters() if p.requires_grad}, strict=False)
    assert early.step == STEPS
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(lora_layers(model2)[name].base_layer.weight, layer.base_layer.weight,
                                   atol=1e-6, rtol=0)


def test_D_is_formed_in_float32_from_bf16_factors():
    """bf16-true training casts A and B to bf16: D = lam s (B A - B0 A0) is still formed in fp32."""
    m = build_method("delta_lora", r=2, alpha=4, update_ratio=2.0, start_step=0, target_modules=["q_proj"])
    m.apply(OneLayer(torch.float32), 1)
    g = torch.Generator().manual_seed(0)
    a, a0 = (torch.randn(2, 256, generator=g).to(torch.bfloat16) for _ in range(2))
    b, b0 = (torch.randn(256, 2, generator=g).to(torch.bfloat16) for _ in range(2))
    m.load_state_dict({"step": 3, "prev": {"q_proj": (a, b)}, "anchor": {"q_proj": (a0, b0)}})
    d = m.moved("q_proj")
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, (b.float() @ a.float() - b0.float() @ a0.float()) * (2.0 * 4 / 2))


class TinyForSequenceClassification(torch.nn.Module):
    def __init__(self, classes: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = torch.nn.Linear(4, 4)
        self.classifier = torch.nn.Linear(4, classes)

    def forward(self, x):
        return self.classifier(self.q_proj(x))


def test_a_classifier_head_is_saved_and_loaded_and_load_names_what_does_not_fit(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    m = build_method("delta_lora", r=2, alpha=4, start_step=0, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="nowhere"):
        build_method("delta_lora", target_modules=["nowhere"]).check(TinyForSequenceClassification())
    m.check(TinyForSequenceClassification())
    model = m.apply(TinyForSequenceClassification(), 3)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    m.save(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(load_file(str(path)))
    loaded = build_method("delta_lora", target_modules=["q_proj"]).load(TinyForSequenceClassification(), tmp_path / "a")
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    with pytest.raises(ValueError) as error:  # a head of another shape
        build_method("delta_lora", target_modules=["q_proj"]).load(TinyForSequenceClassification(3), tmp_path / "a")
    assert str(error.value).startswith(f"{tmp_path / 'a'}: classifier.")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    extra = {f"base_model.model.extra{i}.weight": torch.zeros(1) for i in range(4)}
    save_file({**load_file(str(path)), **extra}, str(path), metadata=meta)
    with pytest.raises(ValueError) as error:
        build_method("delta_lora", target_modules=["q_proj"]).load(TinyForSequenceClassification(), tmp_path / "a")
    assert str(error.value).endswith("tensors with no place in this model: ['base_model.model.extra0.weight', "
                                     "'base_model.model.extra1.weight', 'base_model.model.extra2.weight']")
