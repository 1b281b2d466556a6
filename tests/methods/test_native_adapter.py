"""Houlsby bottleneck adapters: placement, parameter count, near-identity start, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from ftlab.errors import ConfigError
from ftlab.methods import build_method, count_parameters
from ftlab.methods.native.adapter import BottleneckAdapter, auto_targets

HIDDEN, LAYERS, M = 32, 2, 8


def tiny(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=64,
                                            num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2))
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                          embd_pdrop=0.0, attn_pdrop=0.0))
    return BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0))


EXPECTED_WRAPPED = {
    "llama": {f"model.layers.{i}.{n}" for i in range(LAYERS) for n in ("self_attn.o_proj", "mlp.down_proj")},
    "gpt2": {f"transformer.h.{i}.{n}" for i in range(LAYERS) for n in ("attn.c_proj", "mlp.c_proj")},
    "bert": {f"bert.encoder.layer.{i}.{n}" for i in range(LAYERS) for n in ("attention.output.dense", "output.dense")},
}


def batch():
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def adapters(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_two_adapters_per_layer_after_attention_and_ffn(arch):
    base = tiny(arch)
    model = build_method("adapter", bottleneck=M).apply(copy.deepcopy(base), 0)
    assert set(adapters(model)) == EXPECTED_WRAPPED[arch]
    per_adapter = HIDDEN * M + M + M * HIDDEN + HIDDEN
    trainable, total = count_parameters(model)
    assert trainable == 2 * LAYERS * per_adapter
    assert total == count_parameters(base)[1] + trainable
    assert all(".adapter_" in n for n, p in model.named_parameters() if p.requires_grad)
    b = batch()
    with torch.no_grad():  # near identity at step 0
        diff = (model(**b).logits - base(**b).logits).abs().max()
    assert 0 < diff < 1e-4


def test_adapter_math_and_training_touches_only_adapters():
    base = tiny("llama")
    m = build_method("adapter", bottleneck=M, nonlinearity="relu", init_scale=0.1)
    model = m.apply(copy.deepcopy(base), 0)
    layer = model.model.layers[0].self_attn.o_proj
    x = torch.randn(3, HIDDEN)
    h = layer.base_layer(x)
    manual = h + torch.relu(h @ layer.adapter_down.weight.T + layer.adapter_down.bias) @ layer.adapter_up.weight.T \
        + layer.adapter_up.bias
    torch.testing.assert_close(layer(x), manual)

    optimizer = torch.optim.AdamW(m.param_groups(model, lr=1e-2, weight_decay=0.0))
    first = None
    for _ in range(5):
        loss = model(**batch()).loss
        first = first if first is not None else float(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(loss) < first
    original = dict(base.named_parameters())
    for name, p in model.named_parameters():
        if ".adapter_" not in name:
            torch.testing.assert_close(p, original[name.replace(".base_layer", "")], atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_and_load_restore_the_adapters(arch, tmp_path):
    base = tiny(arch)
    m = build_method("adapter", bottleneck=M, nonlinearity="silu", init_scale=0.05)
    model = m.apply(copy.deepcopy(base), 0)
    b = batch()
    with torch.no_grad():
        expected = model(**b).logits
    m.save(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"bottleneck_adapter.json", "bottleneck_adapter.safetensors"}
    other = build_method("adapter")  # default settings: load adopts the saved ones
    loaded = other.load(copy.deepcopy(base), tmp_path)
    assert (other.bottleneck, other.nonlinearity) == (M, "silu")
    assert set(adapters(loaded)) == EXPECTED_WRAPPED[arch]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b).logits, expected, atol=0, rtol=0)


def test_explicit_targets_and_errors():
    model = build_method("adapter", bottleneck=M, target_modules=["down_proj"]).apply(tiny("llama"), 0)
    assert len(adapters(model)) == LAYERS
    for key, value in [("bottleneck", 0), ("nonlinearity", "swish"), ("init_scale", 0)]:
        with pytest.raises(ConfigError, match=f"method.{key}"):
            build_method("adapter", **{key: value})
    with pytest.raises(ConfigError) as error:
        build_method("adapter").check(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    assert str(error.value) == (
        "method.target_modules=auto knows Llama-style (o_proj, down_proj), GPT-2 (attn.c_proj, mlp.c_proj), "
        "BERT (attention.output.dense, output.dense) and Falcon (self_attention.dense, mlp.dense_4h_to_h) "
        "layers; name this model's sublayer output projections in method.target_modules")
    # auto needs both projections of an architecture, not one of them
    half = torch.nn.ModuleDict({"attn": torch.nn.ModuleDict({"o_proj": torch.nn.Linear(4, 4)})})
    with pytest.raises(ConfigError, match="auto knows"):
        auto_targets(half)
    with pytest.raises(ConfigError, match="nowhere"):
        build_method("adapter", target_modules=["nowhere"]).check(TinyForSequenceClassification())


def test_init_is_truncated_normal_with_zero_biases_and_gelu_by_default():
    torch.manual_seed(0)
    layer = BottleneckAdapter(torch.nn.Linear(64, 48), bottleneck=40, init_scale=0.5)
    assert isinstance(layer.adapter_act, torch.nn.GELU)
    assert layer.adapter_down.weight.shape == (40, 48) and layer.adapter_up.weight.shape == (48, 40)
    for linear in (layer.adapter_down, layer.adapter_up):
        w = linear.weight
        assert w.abs().max() <= 1.0 and w.abs().max() > 0.9  # cut at 2 std = 1.0, reached with 1,920 draws
        assert 0.35 < float(w.std()) < 0.5  # N(0, 0.5) cut at +-2 std: std 0.44
        assert torch.count_nonzero(linear.bias) == 0
    small = BottleneckAdapter(torch.nn.Linear(64, 48), bottleneck=40)  # init_scale 1e-3 by default
    assert 0 < float(small.adapter_down.weight.abs().max()) <= 2e-3
    wide = BottleneckAdapter(torch.nn.Linear(4, 4).double(), bottleneck=2)
    assert wide.adapter_down.weight.dtype == wide.adapter_up.weight.dtype == torch.float64  # the base's
    half = BottleneckAdapter(torch.nn.Linear(4, 4).to(torch.bfloat16), bottleneck=2)
    assert half.adapter_down.weight.dtype == torch.float32  # adapters stay fp32 over a half base
    assert half(torch.ones(1, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


class TinyForSequenceClassification(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(4, 4)
        self.classifier = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(self.body(x))


def test_saved_settings_and_a_classifier_head_round_trip(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    m = build_method("adapter", bottleneck=3, nonlinearity="relu", init_scale=0.1, target_modules=["body"])
    model = m.apply(TinyForSequenceClassification(), 0)
    assert model.classifier.weight.requires_grad  # the new head trains whole
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    x = torch.randn(2, 4)
    expected = model(x)
    assert 0.05 < float(model.body.adapter_down.weight.abs().max()) <= 0.2  # init_scale 0.1, cut at 2 std
    out = tmp_path / "run" / "adapter"  # a folder whose parent does not exist yet
    m.save(model, out)
    settings = {"method": "adapter", "paper": "arXiv 1902.00751", "bottleneck": 3, "nonlinearity": "relu",
                "init_scale": 0.1, "target_modules": ["body"]}
    assert (out / "bottleneck_adapter.json").read_text() == json.dumps(settings, indent=2) + "\n"
    assert set(load_file(str(out / "bottleneck_adapter.safetensors"))) == {
        "body.adapter_down.weight", "body.adapter_down.bias", "body.adapter_up.weight", "body.adapter_up.bias",
        "classifier.weight", "classifier.bias"}
    with safe_open(str(out / "bottleneck_adapter.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    other = build_method("adapter")
    loaded = other.load(TinyForSequenceClassification(), out)
    assert other.init_scale == 0.1 and other.target_modules == ["body"]
    torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)
    # an adapter tensor missing from the file is an error naming it and the folder
    tensors = load_file(str(out / "bottleneck_adapter.safetensors"))
    del tensors["body.adapter_up.bias"]
    save_file(tensors, str(out / "bottleneck_adapter.safetensors"))
    with pytest.raises(ValueError) as error:
        build_method("adapter").load(TinyForSequenceClassification(), out)
    assert str(error.value) == f"{out}: no tensor for body.adapter_up.bias (and 0 more)"


class ScaledLinear(torch.nn.Linear):
    def forward(self, x, scale=1.0):
        return super().forward(x) * scale


def test_extra_arguments_reach_the_wrapped_layer():
    torch.manual_seed(0)
    layer = BottleneckAdapter(ScaledLinear(4, 4), bottleneck=2, init_scale=0.5)
    x = torch.randn(3, 4)
    for out in (layer(x, 2.0), layer(x, scale=2.0)):
        h = layer.base_layer(x) * 2.0
        torch.testing.assert_close(out, h + layer.adapter_up(layer.adapter_act(layer.adapter_down(h))))
