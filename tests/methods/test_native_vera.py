"""Native VeRA (``method=vera method.backend=native``) against peft's VeRA."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, VeraConfig, get_peft_model

from ftlab.errors import ConfigError
from ftlab.methods import build_method, count_parameters
from ftlab.methods.native.vera import NativeVera, build_native_vera, vera_layers

from .tiny import ScaledLinear, plain_batch, plain_model

# down_proj (in 64, out 32) next to q/v (in 32, out 32/16): the shared A, B are sliced.
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}
R = 8


def peft_vera(base, arch: str, key: int = 0, save_projection: bool = True):
    config = VeraConfig(r=R, target_modules=TARGETS[arch], projection_prng_key=key,
                        save_projection=save_projection, fan_in_fan_out=arch == "gpt2")
    model = get_peft_model(base, config)
    with torch.no_grad():  # b = 0 at init would make d's gradient 0: randomise both
        for name, p in model.named_parameters():
            if "vera_lambda" in name:
                p.normal_(std=0.5)
    return model


def copy_peft_into_native(peft_model, native) -> None:
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in vera_layers(native).items():
            for part in ("vera_lambda_b", "vera_lambda_d"):
                getattr(layer, part).copy_(params[f"base_model.model.{name}.{part}.default"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_same_projections_outputs_and_gradients_as_peft(arch):
    base = plain_model(arch)
    reference = peft_vera(copy.deepcopy(base), arch, key=7)
    native = build_native_vera(r=R, target_modules=TARGETS[arch], projection_prng_key=7).apply(copy.deepcopy(base))
    layers = vera_layers(native)
    assert len(layers) == 6  # 2 layers x (q, v, down) or (c_attn, attn.c_proj, mlp.c_proj)
    # Regenerated from the key alone, not copied: the shared pair equals peft's.
    shared = next(iter(layers.values())).vera_projections
    torch.testing.assert_close(shared.vera_A, reference.base_model.vera_A["default"], atol=0, rtol=0)
    torch.testing.assert_close(shared.vera_B, reference.base_model.vera_B["default"], atol=0, rtol=0)
    assert all(layer.vera_projections is shared for layer in layers.values())
    assert not any(p.requires_grad for n, p in native.named_parameters() if "vera_lambda" not in n)

    copy_peft_into_native(reference, native)
    b = plain_batch()
    out_ref, out_nat = reference(**b), native(**b)
    torch.testing.assert_close(out_nat.logits, out_ref.logits, atol=1e-5, rtol=0)
    out_ref.loss.backward()
    out_nat.loss.backward()
    params = dict(reference.named_parameters())
    for name, layer in layers.items():
        for part in ("vera_lambda_b", "vera_lambda_d"):
            g_nat = getattr(layer, part).grad
            assert g_nat is not None and g_nat.abs().sum() > 0
            torch.testing.assert_close(g_nat, params[f"base_model.model.{name}.{part}.default"].grad,
                                       atol=1e-5, rtol=0)


def test_init_b_zero_d_initial_and_counts():
    base = plain_model("llama")
    method = build_native_vera(r=R, d_initial=0.25, target_modules=TARGETS["llama"])
    model = method.apply(copy.deepcopy(base))
    reference = get_peft_model(copy.deepcopy(base), VeraConfig(r=R, d_initial=0.25, target_modules=TARGETS["llama"]))
    layers = vera_layers(model)
    formula = sum(layer.out_features + R for layer in layers.values())
    assert count_parameters(model)[0] == count_parameters(reference)[0] == formula
    for layer in layers.values():
        assert torch.count_nonzero(layer.vera_lambda_b) == 0
        assert torch.all(layer.vera_lambda_d == 0.25)
    b = plain_batch()
    with torch.no_grad():  # b = 0: the model is unchanged at step 0
        torch.testing.assert_close(model(**b).logits, base(**b).logits, atol=0, rtol=0)
    # The projections are buffers, kept once and out of the model's state dict.
    assert not any("vera_A" in k or "vera_B" in k for k in model.state_dict())
    assert sum(1 for n, _ in model.named_buffers() if n.endswith("vera_A")) == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_equals_unmerged(arch):
    base = plain_model(arch)
    model = build_native_vera(r=R, target_modules=TARGETS[arch]).apply(copy.deepcopy(base))
    copy_peft_into_native(peft_vera(copy.deepcopy(base), arch), model)
    b = plain_batch()
    with torch.no_grad():
        before = model(**b).logits
        for layer in vera_layers(model).values():
            layer.merge()
        merged = model(**b).logits
        for layer in vera_layers(model).values():
            layer.unmerge()
        torch.testing.assert_close(merged, before, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(**b).logits, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("arch", "save_projection"), [("llama", True), ("llama", False), ("gpt2", True)])
def test_save_loads_in_plain_peft_and_back(arch, save_projection, tmp_path):
    base = plain_model(arch)
    method = build_native_vera(r=R, target_modules=TARGETS[arch], projection_prng_key=3,
                               save_projection=save_projection)
    model = method.apply(copy.deepcopy(base))
    copy_peft_into_native(peft_vera(copy.deepcopy(base), arch), model)
    b = plain_batch()
    with torch.no_grad():
        expected = model(**b).logits
    method.save(model, tmp_path)

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))  # plain peft
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b).logits, expected, atol=1e-5, rtol=0)
    again = build_native_vera(r=2).load(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(**b).logits, expected, atol=1e-5, rtol=0)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="method.r"):
        build_native_vera(r=0)
    with pytest.raises(ConfigError, match="method.dropout"):
        build_native_vera(dropout=1.5)
    with pytest.raises(ConfigError, match="method.projection_prng_key"):
        build_native_vera(projection_prng_key="seed")
    with torch.device("meta"):
        meta = plain_model("llama")
    with pytest.raises(ConfigError, match="method.target_modules"):
        build_native_vera(target_modules=["nope"]).check(meta)


def test_vera_builder_native_backend():
    method = build_method("vera", backend="native", r=R, target_modules=["q_proj"])
    assert isinstance(method, NativeVera) and method.r == R


def test_layer_formula_repr_dropout_and_projection_checks():
    """h = W0 x + b0 + lambda_b * (B_s (lambda_d * (A_s x))), A_s and B_s the top-left corners of
    the shared A (r x max_in) and B (max_out x r); b starts at 0, d at d_initial."""
    from ftlab.methods.native.vera import VeraLinear, VeraProjections, kaiming_uniform, projections_from_key

    torch.manual_seed(0)
    a, b = projections_from_key(7, 4, 6, 5)
    assert a.shape == (4, 6) and b.shape == (5, 4)
    # kaiming uniform, bound sqrt(6 / fan_in): fan_in 6 for A, 4 for B; drawn A first, then B
    g = torch.Generator().manual_seed(7)
    first = torch.empty(4, 6).uniform_(-1.0, 1.0, generator=g)
    torch.testing.assert_close(a, first)  # sqrt(6 / 6) = 1
    assert b.abs().max() <= (6 / 4) ** 0.5 and b.abs().max() > 0.5 * (6 / 4) ** 0.5
    assert torch.equal(kaiming_uniform((2, 3), torch.Generator().manual_seed(1)),
                       torch.empty(2, 3).uniform_(-(2 ** 0.5), 2 ** 0.5, generator=torch.Generator().manual_seed(1)))

    base = torch.nn.Linear(3, 2)
    layer = VeraLinear(base, VeraProjections(a, b), r=4, d_initial=0.5)
    assert torch.equal(layer.vera_lambda_b, torch.zeros(2)) and torch.equal(layer.vera_lambda_d, torch.full((4,), 0.5))
    assert "vera_A" not in layer.state_dict() and "vera_projections.vera_A" not in layer.state_dict()
    assert layer.extra_repr() == "r=4, in=3, out=2"
    assert isinstance(layer.vera_dropout, torch.nn.Identity)
    with torch.no_grad():
        layer.vera_lambda_b.copy_(torch.tensor([1.0, -2.0]))
    x = torch.randn(3, 3)
    a_s, b_s = a[:4, :3], b[:2, :4]
    expected = base(x) + torch.tensor([1.0, -2.0]) * ((0.5 * (x @ a_s.T)) @ b_s.T)
    torch.testing.assert_close(layer(x), expected)
    delta = torch.tensor([1.0, -2.0])[:, None] * b_s @ (0.5 * a_s)
    torch.testing.assert_close(layer.get_delta_weight(), delta)
    assert VeraLinear(torch.nn.Linear(3, 2), VeraProjections(a, b), r=4, dropout=0.25).vera_dropout.p == 0.25

    model = plain_model("llama")
    small = projections_from_key(0, 2, 8, 8)
    with pytest.raises(ValueError, match=r"VeRA projections of shapes \(2, 8\), \(8, 2\) cannot serve r=4, "
                                         r"in=32, out=32"):
        NativeVera(r=4, target_modules=["q_proj"]).apply(model, projections=small)


def test_saved_config_and_load_defaults(tmp_path):
    import json

    base = plain_model("llama")
    method = build_native_vera(r=R, d_initial=0.25, projection_prng_key=3, dropout=0.1, target_modules=["q_proj"],
                               save_projection=False)
    model = method.apply(copy.deepcopy(base))
    method.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("r", "d_initial", "projection_prng_key", "save_projection", "vera_dropout",
                                   "target_modules", "fan_in_fan_out", "task_type")} == {
        "r": R, "d_initial": 0.25, "projection_prng_key": 3, "save_projection": False, "vera_dropout": 0.1,
        "target_modules": ["q_proj"], "fan_in_fan_out": False, "task_type": "CAUSAL_LM"}
    again = build_native_vera(r=2).load(copy.deepcopy(base), tmp_path)
    layer = next(iter(vera_layers(again).values()))
    assert (layer.r, layer.vera_dropout.p, float(layer.vera_lambda_d[0])) == (R, 0.1, 0.25)
    for key in ("d_initial", "vera_dropout", "save_projection"):
        del config[key]  # an adapter_config.json without them: peft's defaults
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    method = build_native_vera(r=2)
    again = method.load(copy.deepcopy(base), tmp_path)
    assert isinstance(next(iter(vera_layers(again).values())).vera_dropout, torch.nn.Identity)
    with pytest.raises(ConfigError, match="method.d_initial must be a number, got 'x'"):
        build_native_vera(d_initial="x")
    with pytest.raises(ConfigError, match="method.projection_prng_key must be an integer, got True"):
        build_native_vera(projection_prng_key=True)
    with pytest.raises(ConfigError, match="method.d_initial must be a number, got True"):
        build_native_vera(d_initial=True)


class TinyForSequenceClassification(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = torch.nn.Linear(4, 4)
        self.classifier = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(self.q_proj(x))


def test_builder_checks_its_own_ranges_and_keeps_save_projection():
    with pytest.raises(ConfigError, match=r"^method\.r "):
        build_native_vera(r=1.5)
    with pytest.raises(ConfigError, match=r"^method\.dropout "):
        build_native_vera(dropout=1.5)
    assert build_native_vera().save_projection and not build_native_vera(save_projection=False).save_projection
    default = build_native_vera()
    assert (default.r, default.d_initial, default.projection_prng_key, default.dropout) == (256, 0.1, 0, 0.0)


def test_layer_dtypes_extra_arguments_a_bf16_base_and_projection_shapes():
    from ftlab.methods.native.vera import VeraLinear, VeraProjections, projections_from_key

    shared = VeraProjections(*projections_from_key(0, 2, 4, 3))
    wide = VeraLinear(torch.nn.Linear(4, 3).double(), shared, 2, 0.5)
    assert wide.vera_lambda_b.dtype == wide.vera_lambda_d.dtype == torch.float64
    torch.nn.init.normal_(wide.vera_lambda_b)
    x64 = torch.randn(2, 4, dtype=torch.float64)
    a64, b64 = shared.vera_A[:2, :4].double(), shared.vera_B[:3, :2].double()  # A, B in the base's dtype too
    torch.testing.assert_close(wide(x64), wide.base_layer(x64) + wide.vera_lambda_b * ((0.5 * (x64 @ a64.T)) @ b64.T),
                               atol=1e-12, rtol=1e-12)
    assert float(VeraLinear(torch.nn.Linear(4, 3), shared, 2).vera_lambda_d[0]) == pytest.approx(0.1)  # default
    layer = VeraLinear(ScaledLinear(4, 3), shared, 2, 0.5)
    torch.nn.init.normal_(layer.vera_lambda_b)
    x = torch.randn(2, 4)
    a, b = shared.vera_A[:2, :4], shared.vera_B[:3, :2]
    branch = layer.vera_lambda_b * ((0.5 * (x @ a.T)) @ b.T)
    for out in (layer(x, 3.0), layer(x, scale=3.0)):
        torch.testing.assert_close(out, layer.base_layer(x) * 3.0 + branch)
    half = VeraLinear(torch.nn.Linear(4, 3).to(torch.bfloat16), shared, 2, 0.5)
    assert half(torch.ones(2, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
    m = build_native_vera(r=2, target_modules=["q_proj"])  # one target
    a, b = projections_from_key(0, 2, 4, 4)
    for bad in [(a[:1], b), (a[:, :3], b), (a, b[:3]), (a, b[:, :1])]:
        with pytest.raises(ValueError, match="cannot serve r=2, in=4, out=4"):
            m.apply(TinyForSequenceClassification(), projections=bad)


def test_a_classifier_and_the_saved_projections_round_trip(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    m = build_native_vera(r=2, d_initial=0.25, target_modules=["q_proj"])
    model = m.apply(TinyForSequenceClassification(), 0)
    assert model.classifier.weight.requires_grad
    layer = model.q_proj
    with torch.no_grad():
        layer.vera_lambda_b.normal_()
        layer.vera_projections.vera_A.mul_(2.0)  # not the key's draw any more: load must read the file's
        model.classifier.weight.add_(1.0)
    x = torch.randn(3, 4)
    expected = model(x)
    m.save(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["classifier"])
    other = build_native_vera(r=4, d_initial=0.5, save_projection=False)
    loaded = other.load(TinyForSequenceClassification(), tmp_path / "a")
    torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "base_model.vera_B"},
              str(tmp_path / "a" / "adapter_model.safetensors"))
    build_native_vera().load(TinyForSequenceClassification(), tmp_path / "a")  # A alone: both from the key
    del tensors["base_model.model.q_proj.vera_lambda_d"]
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError) as error:
        build_native_vera().load(TinyForSequenceClassification(), tmp_path / "a")
    assert str(error.value) == f"{tmp_path / 'a'}: no tensor for q_proj.vera_lambda_d (and 0 more)"


def test_saved_config_of_a_conv1d_model_is_fan_in_fan_out(tmp_path):
    import json

    from transformers.pytorch_utils import Conv1D

    model = torch.nn.Module()
    model.c_attn = Conv1D(6, 4)
    m = build_native_vera(r=2, target_modules=["c_attn"])
    m.save(m.apply(model, 0), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"]
