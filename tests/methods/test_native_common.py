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


class _HeadForSequenceClassification(nn.Module):
    """No get_output_embeddings; a head of two layers, a plain ``score`` head and a layer whose
    name only starts like the head's."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.classifier = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        self.score = nn.Linear(4, 2)
        self.classifier2 = nn.Linear(4, 4)


def test_all_linear_leaves_out_the_classification_head_and_needs_no_output_layer():
    model = _HeadForSequenceClassification()
    assert common.all_linear_paths(model) == ["body", "classifier2"]
    assert common.find_targets(model, "all-linear") == ["body", "classifier2"]
    assert common.all_linear_paths(nn.Sequential(nn.Linear(2, 2))) == ["0"]  # no output layer to leave out


def test_replace_layers_passes_each_path_to_wrap():
    seen = []
    common.replace_layers(_Net(), ["layers.0.q_proj", "lm_head"], lambda name, layer: seen.append(name) or layer)
    assert seen == ["layers.0.q_proj", "lm_head"]


def test_target_errors_name_four_unsupported_layers_and_every_linear_layer():
    net = nn.ModuleDict({f"e{i}": nn.Embedding(2, 2) for i in range(5)})
    with pytest.raises(ConfigError) as error:
        common.find_targets(net, ["e0", "e1", "e2", "e3", "e4"])
    assert str(error.value).endswith(
        ": e0 (Embedding), e1 (Embedding), e2 (Embedding), e3 (Embedding); "
        "native methods adapt nn.Linear (and Falcon's FalconLinear) and Conv1D layers only")
    with pytest.raises(ConfigError) as error:
        common.find_targets(_Net(), ["k_proj"])
    assert str(error.value).endswith("its linear layers are: q_proj, v_proj"), str(error.value)


def test_save_peft_format_into_an_existing_folder(tmp_path):
    from peft import LoraConfig

    common.save_peft_format(tmp_path, LoraConfig(r=2, target_modules=["q_proj"]), {"x": torch.ones(1)})
    common.save_peft_format(tmp_path, LoraConfig(r=2, target_modules=["q_proj"]), {"x": torch.zeros(1)})
    assert torch.equal(common.read_peft_format(tmp_path, "LORA")[1]["x"], torch.zeros(1))


def test_merge_into_a_bf16_base_adds_the_delta_rounded_to_bf16():
    # w0 = 1 + 2^-7 (odd last bf16 bit), dW = 0.0039: rounded to bf16 first (0.00390625, as peft
    # does), the sum is a tie that rounds to even (1 + 2^-6); summed in fp32 it stays at w0.
    layer = LoraLinear(nn.Linear(1, 1, bias=False).to(torch.bfloat16), r=1, alpha=1)
    with torch.no_grad():
        layer.base_layer.weight.fill_(1.0078125)
        layer.lora_A.weight.fill_(1.0)
        layer.lora_B.weight.fill_(0.0039)
    layer.merge()
    assert layer.base_layer.weight.item() == 1.015625
    layer.unmerge()  # 1.015625 - 0.00390625 = 1.01171875, a tie again: stays at 1.015625
    assert layer.base_layer.weight.item() == 1.015625 and not layer.merged
    # 1 + 3 * 2^-7 - 0.00390625 is a tie that rounds to 1 + 2^-6; minus 0.0039 in fp32 it would round up
    with torch.no_grad():
        layer.base_layer.weight.fill_(1.0234375)
    layer.merged = True
    layer.unmerge()
    assert layer.base_layer.weight.item() == 1.015625
