"""What the native methods share (ftlab/methods/native/common.py): target matching, the
classification head, peft's adapter format on disk and loading tensors back, on modules
built by hand."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ftlab.errors import ConfigError
from ftlab.methods.native import common
from ftlab.methods.native.lora import LoraLinear


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(4, 3), nn.Linear(4, 2)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.embed = nn.Embedding(5, 4)
        self.lm_head = nn.Linear(4, 5)

    def get_output_embeddings(self):
        return self.lm_head


class TinyForSequenceClassification(nn.Module):
    def __init__(self, head: str = "classifier"):
        super().__init__()
        self.body = nn.Linear(4, 4)
        setattr(self, head, nn.Linear(4, 2))


def test_matching_is_peft_s_suffix_rule():
    assert common.matches("layers.0.q_proj", ["q_proj"])
    assert common.matches("layers.0.q_proj", ["layers.0.q_proj"])
    assert not common.matches("layers.0.xq_proj", ["q_proj"])  # a suffix after a dot only
    assert not common.matches("layers.0.q_proj", ["v_proj", "k_proj"])
    assert common.resolve_targets(_Net(), "q_proj") == ["q_proj"]
    assert common.resolve_targets(_Net(), ("q_proj", "v_proj")) == ["q_proj", "v_proj"]
    assert common.resolve_targets(_Net(), "all-linear") == [
        "layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]  # not the LM head


def test_find_targets_wraps_linear_layers_once_and_names_what_it_cannot_wrap():
    net = _Net()
    assert common.find_targets(net, ["q_proj"]) == ["layers.0.q_proj", "layers.1.q_proj"]
    common.replace_layers(net, ["layers.0.q_proj"], lambda _, layer: LoraLinear(layer, 2, 4))
    assert common.find_targets(net, ["q_proj"]) == ["layers.1.q_proj"]  # a wrapper is not wrapped again
    with pytest.raises(ConfigError, match=r"^method\.x=\[embed,layers\] selects layers a native method cannot "
                                          r"wrap: layers \(ModuleList\), embed \(Embedding\); native"):
        common.find_targets(net, ["embed", "layers"], key="method.x")
    with pytest.raises(ConfigError, match=r"method.target_modules=\[k_proj\] matches no module"):
        common.find_targets(net, ["k_proj"])


def test_conv1d_features_and_adapter_dtypes():
    assert common.in_out_features(Conv1D(3, 4)) == (4, 3)  # weight stored (in, out)
    assert common.in_out_features(nn.Linear(4, 3)) == (4, 3)
    for dtype, expected in [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                            (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        assert common.adapter_dtype(torch.zeros(1, dtype=dtype)) == expected


@pytest.mark.parametrize("head", ["classifier", "score"])
def test_classification_heads_train_and_save_under_peft_keys(head):
    model = TinyForSequenceClassification(head).requires_grad_(False)
    assert common.classification_heads(model) == [head]
    common.train_heads(model)
    assert getattr(model, head).weight.requires_grad and not model.body.weight.requires_grad
    assert set(common.head_tensors(model)) == {f"base_model.model.{head}.weight", f"base_model.model.{head}.bias"}
    assert common.peft_task(model) == {"task_type": "SEQ_CLS", "modules_to_save": [head]}
    assert common.classification_heads(_Net()) == [] and common.head_tensors(_Net()) == {}
    assert common.peft_task(_Net()) == {"task_type": "CAUSAL_LM"}


def test_saved_target_modules_are_leaves_unless_they_select_more():
    net = _Net()
    assert common.peft_target_modules(net, ["layers.0.q_proj", "layers.1.q_proj"]) == ["q_proj"]
    assert common.peft_target_modules(net, ["layers.1.v_proj", "layers.0.q_proj", "layers.1.q_proj"]) == [
        "layers.0.q_proj", "layers.1.q_proj", "layers.1.v_proj"]  # v_proj would select layers.0.v_proj too


def test_merge_and_unmerge_happen_once():
    layer = LoraLinear(nn.Linear(4, 3), r=2, alpha=4)
    nn.init.normal_(layer.lora_B.weight)
    w0, delta = layer.base_layer.weight.detach().clone(), layer.get_delta_weight().detach()
    layer.unmerge()  # not merged: nothing to take out
    torch.testing.assert_close(layer.base_layer.weight, w0)
    layer.merge()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, w0 + delta)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0)


def test_peft_format_round_trip_and_its_errors(tmp_path):
    from peft import LoraConfig

    directory = tmp_path / "a" / "b"  # parents are made
    tensors = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.arange(6.0).reshape(2, 3).T}  # not contiguous
    common.save_peft_format(directory, LoraConfig(r=2, target_modules=["q_proj"]), tensors, {"note": "x"})
    config, loaded, metadata = common.read_peft_format(directory, "LORA")
    assert config["peft_type"] == "LORA" and config["r"] == 2
    torch.testing.assert_close(loaded["base_model.model.layers.0.q_proj.lora_A.weight"],
                               torch.arange(6.0).reshape(2, 3).T)
    assert metadata == {"format": "pt", "note": "x"}
    with pytest.raises(ValueError, match="holds a LORA adapter, not VERA"):
        common.read_peft_format(directory, "VERA")
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no peft adapter"):
        common.read_peft_format(directory, "LORA")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError):
        common.read_peft_format(tmp_path / "c", "LORA")
    assert json.loads((directory / "adapter_config.json").read_text())["r"] == 2


def test_load_named_fills_parameters_and_refuses_what_does_not_fit():
    net = _Net()
    common.replace_layers(net, ["layers.0.q_proj", "layers.1.q_proj"], lambda _, layer: LoraLinear(layer, 2, 4))
    a0, a1 = torch.full((2, 4), 1.0), torch.full((2, 4), 2.0)
    tensors = {"base_model.model.layers.0.q_proj.lora_A.weight": a0, "layers.1.q_proj.lora_A.weight": a1,
               "layers.0.q_proj.lora_B.weight": torch.ones(3, 2), "layers.1.q_proj.lora_B.weight": torch.ones(3, 2)}
    common.load_named(net, tensors, ".lora_", "dir")
    assert torch.equal(net.layers[0].q_proj.lora_A.weight, a0) and torch.equal(net.layers[1].q_proj.lora_A.weight, a1)
    with pytest.raises(ValueError, match=r"dir: tensor 'nope.weight' has no place in this model"):
        common.load_named(net, {**tensors, "nope.weight": a0}, ".lora_", "dir")
    partial = {k: v for k, v in tensors.items() if "layers.1" not in k}
    with pytest.raises(ValueError, match=r"dir: no tensor for layers.1.q_proj.lora_A.weight \(and 1 more\)"):
        common.load_named(net, partial, ".lora_", "dir")
    common.load_named(net, partial, None, "dir")  # no marker: nothing is required
    with pytest.raises(ValueError, match=r"dir: layers.0.q_proj.lora_A.weight has shape \(4, 2\), the model "
                                         r"expects \(2, 4\)"):
        common.load_named(net, {**tensors, "layers.0.q_proj.lora_A.weight": a0.T}, ".lora_", "dir")
