"""Native LoRA (``method=lora method.backend=native``) against peft's LoRA."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from ftlab.errors import ConfigError
from ftlab.methods import build_method, count_parameters
from ftlab.methods.native.lora import LoraLinear, lora_layers

from .tiny import ScaledLinear, plain_batch, plain_model

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def native_lora(arch: str, **kw):
    args = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": TARGETS[arch], "backend": "native"} | kw
    return build_method("lora", **args)


def peft_lora(base, arch: str):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[arch],
                        fan_in_fan_out=arch == "gpt2")
    model = get_peft_model(base, config)
    with torch.no_grad():  # B = 0 would make A's gradient 0: give both a random B
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def copy_peft_into_native(peft_model, native) -> int:
    peft_params = dict(peft_model.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, layer in lora_layers(native).items():
            for part in ("lora_A", "lora_B"):
                getattr(layer, part).weight.copy_(peft_params[f"base_model.model.{name}.{part}.default.weight"])
                copied += 1
    return copied


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_same_outputs_and_gradients_as_peft(arch):
    base = plain_model(arch)
    reference = peft_lora(copy.deepcopy(base), arch)
    native = native_lora(arch).apply(copy.deepcopy(base), 0)
    layers = lora_layers(native)
    assert copy_peft_into_native(reference, native) == 2 * len(layers) == 2 * 2 * len(TARGETS[arch])
    if arch == "gpt2":
        assert all(layer.fan_in_fan_out for layer in layers.values())

    b = plain_batch()
    out_ref, out_nat = reference(**b), native(**b)
    torch.testing.assert_close(out_nat.logits, out_ref.logits, atol=1e-5, rtol=0)
    out_ref.loss.backward()
    out_nat.loss.backward()
    ref_params = dict(reference.named_parameters())
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            g_ref = ref_params[f"base_model.model.{name}.{part}.default.weight"].grad
            g_nat = getattr(layer, part).weight.grad
            assert g_nat is not None and g_nat.abs().sum() > 0
            torch.testing.assert_close(g_nat, g_ref, atol=1e-5, rtol=0)
        assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trainable_count_equals_peft_and_formula(arch):
    base = plain_model(arch)
    native = native_lora(arch).apply(copy.deepcopy(base), 0)
    reference = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch],
                                                               fan_in_fan_out=arch == "gpt2"))
    formula = sum(4 * (layer.in_features + layer.out_features) for layer in lora_layers(native).values())
    assert count_parameters(native)[0] == count_parameters(reference)[0] == formula
    trainable = [n for n, p in native.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert count_parameters(native)[1] == count_parameters(base)[1] + formula


def test_init_is_kaiming_uniform_and_zero_B():
    model = native_lora("llama", r=8).apply(plain_model("llama"), 0)
    for layer in lora_layers(model).values():
        a = layer.lora_A.weight
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5)): sqrt(6 / (6 fan_in))
        assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound  # a = sqrt(6) would cut at 0.926
        assert torch.count_nonzero(layer.lora_B.weight) == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_equals_unmerged(arch):
    base = plain_model(arch)
    model = native_lora(arch).apply(copy.deepcopy(base), 0)
    copy_peft_into_native(peft_lora(copy.deepcopy(base), arch), model)
    b = plain_batch()
    with torch.no_grad():
        before = model(**b).logits
        originals = {n: layer.base_layer.weight.clone() for n, layer in lora_layers(model).items()}
        for layer in lora_layers(model).values():
            layer.merge()
        merged = model(**b).logits
        for layer in lora_layers(model).values():
            layer.unmerge()
        after = model(**b).logits
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    for n, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, originals[n], atol=1e-6, rtol=0)
    layer = next(iter(lora_layers(model).values()))
    expected = 2.0 * layer.lora_B.weight @ layer.lora_A.weight  # s = alpha / r = 8 / 4
    assert layer.get_delta_weight().shape == layer.base_layer.weight.shape
    torch.testing.assert_close(layer.get_delta_weight(), expected.T if arch == "gpt2" else expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_loads_in_plain_peft_and_back(arch, tmp_path):
    base = plain_model(arch)
    method = native_lora(arch)
    model = method.apply(copy.deepcopy(base), 0)
    copy_peft_into_native(peft_lora(copy.deepcopy(base), arch), model)
    b = plain_batch()
    with torch.no_grad():
        expected = model(**b).logits
    method.save(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}

    # Plain peft and transformers only: what a user without ftlab would run.
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b).logits, expected, atol=1e-5, rtol=0)

    again = native_lora(arch).load(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(**b).logits, expected, atol=1e-5, rtol=0)
    assert isinstance(again.get_submodule(next(iter(lora_layers(model)))), LoraLinear)


def test_reads_adapters_saved_by_peft(tmp_path):
    base = plain_model("llama")
    reference = peft_lora(copy.deepcopy(base), "llama")
    reference.save_pretrained(str(tmp_path))
    model = native_lora("llama", r=2, alpha=1).load(copy.deepcopy(base), tmp_path)
    b = plain_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**b).logits, reference(**b).logits, atol=1e-5, rtol=0)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="method.bias"):
        build_method("lora", backend="native", bias="all")
    with pytest.raises(ConfigError, match="method.r"):
        build_method("lora", backend="native", r=0)
    method = build_method("lora", backend="native", target_modules=["nope"])
    with torch.device("meta"):
        meta = plain_model("llama")
    with pytest.raises(ConfigError, match=r"method.target_modules=\[nope\] matches no module.*q_proj"):
        method.check(meta)
    with pytest.raises(ConfigError, match="cannot wrap"):
        build_method("lora", backend="native", target_modules=["embed_tokens"]).check(meta)
    build_method("lora", backend="native", target_modules="all-linear").check(meta)


def test_layer_formula_defaults_rslora_dropout_and_repr():
    """h = W0 x + b0 + s B A x with s = alpha / r (rsLoRA: alpha / sqrt(r)); no dropout by default."""
    torch.manual_seed(0)
    base = torch.nn.Linear(5, 3)
    layer = LoraLinear(base, r=4, alpha=8).train()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ base.weight.T + base.bias + 2.0 * x @ A.T @ B.T
    torch.testing.assert_close(layer(x), expected)
    assert layer.extra_repr() == "r=4, scaling=2, fan_in_fan_out=False"
    assert LoraLinear(torch.nn.Linear(5, 3), r=4, alpha=8, use_rslora=True).scaling == 4.0  # 8 / sqrt(4)
    layer.merge()  # merged: the base layer alone, with W0 + s B A
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)
    layer.unmerge()

    dropped = LoraLinear(torch.nn.Linear(5, 3), r=4, alpha=8, dropout=0.5)
    torch.nn.init.normal_(dropped.lora_B.weight)
    assert isinstance(dropped.lora_dropout, torch.nn.Dropout) and dropped.lora_dropout.p == 0.5
    dropped.train()
    assert not torch.equal(dropped(x), dropped(x))  # a new mask each pass
    dropped.eval()
    torch.testing.assert_close(dropped(x), dropped(x))


def test_saved_config_carries_every_setting_and_load_reads_them(tmp_path):
    import json

    base = plain_model("llama")
    base.config._name_or_path = "org/tiny-llama"
    method = native_lora("llama", dropout=0.1, use_rslora=True)
    model = method.apply(copy.deepcopy(base), 0)
    method.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "fan_in_fan_out",
                                   "base_model_name_or_path", "task_type", "bias")} == {
        "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "use_rslora": True, "fan_in_fan_out": False,
        "base_model_name_or_path": "org/tiny-llama", "task_type": "CAUSAL_LM", "bias": "none"}
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    again = build_method("lora", backend="native").load(copy.deepcopy(base), tmp_path)  # r=8 etc. replaced
    layer = next(iter(lora_layers(again).values()))
    assert (layer.r, layer.scaling, layer.lora_dropout.p) == (4, 8 / math.sqrt(4), 0.1)
    assert len(lora_layers(again)) == 6

    del config["lora_dropout"]  # older adapters: no dropout
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    again = build_method("lora", backend="native").load(copy.deepcopy(base), tmp_path)
    assert isinstance(next(iter(lora_layers(again).values())).lora_dropout, torch.nn.Identity)
    for key, value, missing in [("use_dora", True, "no use_dora"), ("lora_bias", True, "no lora_bias"),
                                ("bias", "all", "no extras")]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=rf"native LoRA reads plain LoRA adapters only \(bias='none', {missing}\)"):
            build_method("lora", backend="native").load(copy.deepcopy(base), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "VERA"}))
    with pytest.raises(ValueError, match="not LORA"):
        build_method("lora", backend="native").load(copy.deepcopy(base), tmp_path)


def test_config_names_the_base_from_the_model_or_its_config():
    from ftlab.methods.native.lora import peft_lora_config

    model = native_lora("llama").apply(plain_model("llama"), 0)
    assert peft_lora_config(model, 4, 8, 0.0, False).base_model_name_or_path is None  # a random model: none
    model.config._name_or_path = "org/x"
    assert peft_lora_config(model, 4, 8, 0.0, False).base_model_name_or_path == "org/x"

    class Wrapped(torch.nn.Module):  # no name_or_path of its own, only a config's
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

    assert peft_lora_config(Wrapped(model), 4, 8, 0.0, False).base_model_name_or_path == "org/x"


class TinyForSequenceClassification(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = torch.nn.Linear(4, 4)
        self.classifier = torch.nn.Linear(4, 2)
        self.name_or_path = "org/own-name"  # no config: the model's own name


def test_layer_dtypes_extra_arguments_and_a_bf16_base():
    from transformers.pytorch_utils import Conv1D

    from ftlab.methods.native.lora import peft_lora_config

    wide = LoraLinear(torch.nn.Linear(4, 3).double(), r=2, alpha=4)
    assert wide.lora_A.weight.dtype == wide.lora_B.weight.dtype == torch.float64  # the base's dtype
    layer = LoraLinear(ScaledLinear(4, 3), r=2, alpha=4)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 4)
    branch = layer.lora_B(layer.lora_A(x)) * 2
    for out in (layer(x, 3.0), layer(x, scale=3.0)):
        torch.testing.assert_close(out, layer.base_layer(x) * 3.0 + branch)
    half = LoraLinear(torch.nn.Linear(4, 3).to(torch.bfloat16), r=2, alpha=4)  # fp32 adapter
    assert half(torch.ones(2, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
    gpt2_like = torch.nn.Module()
    gpt2_like.c_attn = Conv1D(6, 4)
    native_lora("gpt2", target_modules=["c_attn"]).apply(gpt2_like, 0)
    assert peft_lora_config(gpt2_like, 2, 4, 0.0, False).fan_in_fan_out


def test_a_classifier_head_and_the_model_s_own_name_are_saved(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    m = native_lora("llama", target_modules=["q_proj"])
    model = m.apply(TinyForSequenceClassification(), 0)
    m.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["task_type"], config["modules_to_save"], config["base_model_name_or_path"]) == (
        "SEQ_CLS", ["classifier"], "org/own-name")
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(tensors)
    del config["bias"]  # a config without "bias" is a plain LoRA adapter too
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    build_method("lora", backend="native").load(TinyForSequenceClassification(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True, "lora_bias": True}))
    with pytest.raises(ValueError, match=r"plain LoRA adapters only \(bias='none', no use_dora, lora_bias\)$"):
        build_method("lora", backend="native").load(TinyForSequenceClassification(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    del tensors["base_model.model.q_proj.lora_B.weight"]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError) as error:
        build_method("lora", backend="native").load(TinyForSequenceClassification(), tmp_path)
    assert str(error.value) == f"{tmp_path}: no tensor for q_proj.lora_B.weight (and 0 more)"
    with pytest.raises(ConfigError) as error:
        build_method("lora", backend="native", bias="all")
    assert str(error.value) == ("method.bias='all' is not supported by method.backend=native; "
                                "use method.bias=none or method.backend=peft")


def test_native_builder_defaults():
    from ftlab.methods.native.lora import NativeLora, build_native_lora

    assert build_native_lora() == NativeLora(r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj"),
                                             use_rslora=False)
