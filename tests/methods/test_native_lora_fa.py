"""LoRA-FA: frozen A, trained B; activation memory; peft's optimizer variant; peft export."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_lorafa_optimizer
from peft.optimizers.lorafa import LoraFAOptimizer
from transformers import LlamaConfig, LlamaForCausalLM

from ftlab.config import OptimizerSettings, SchedulerSettings
from ftlab.errors import ConfigError
from ftlab.methods import build_method, count_parameters
from ftlab.methods.native.lora import LoraLinear, lora_layers
from ftlab.training.module import FinetuneModule

TARGETS = ["q_proj", "v_proj"]


def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def batch():
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def lora_fa(**kw):
    return build_method("lora_fa", **({"r": 4, "alpha": 8, "target_modules": TARGETS} | kw))


def activation_bytes(fn, params) -> tuple[int, list[tuple[int, ...]]]:
    """Bytes of the distinct non-parameter tensors autograd saves for backward while ``fn`` runs."""
    own = {p.data_ptr() for p in params}
    seen: dict[int, torch.Tensor] = {}

    def pack(t):
        if t.data_ptr() not in own:
            seen[t.data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(t.numel() * t.element_size() for t in seen.values()), [tuple(t.shape) for t in seen.values()], out


def test_backward_keeps_A_x_not_x_and_gradients_are_right():
    torch.manual_seed(0)
    n_in, n_out, r, tokens = 1024, 64, 4, 256
    base = torch.nn.Linear(n_in, n_out, bias=False).requires_grad_(False)
    lora = LoraLinear(copy.deepcopy(base), r, alpha=8)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    fa = LoraLinear(copy.deepcopy(base), r, alpha=8)
    fa.load_state_dict(lora.state_dict())
    fa.lora_A.weight.requires_grad_(False)
    x = torch.randn(tokens, n_in)
    x_lora, x_fa = x.clone().requires_grad_(True), x.clone().requires_grad_(True)  # hidden states need grads

    bytes_lora, shapes_lora, y_lora = activation_bytes(lambda: lora(x_lora), list(lora.parameters()))
    bytes_fa, shapes_fa, y_fa = activation_bytes(lambda: fa(x_fa), list(fa.parameters()))
    assert (tokens, n_in) in shapes_lora  # LoRA keeps x for A's gradient ...
    assert shapes_fa == [(tokens, r)]  # ... LoRA-FA keeps only A x
    assert bytes_fa == tokens * r * 4
    assert bytes_lora - bytes_fa == tokens * n_in * 4

    # Same function, same gradient for B and for the input (it still flows through A^T B^T g).
    torch.testing.assert_close(y_fa, y_lora)
    g = torch.randn_like(y_lora)
    y_lora.backward(g)
    y_fa.backward(g)
    torch.testing.assert_close(fa.lora_B.weight.grad, lora.lora_B.weight.grad)
    torch.testing.assert_close(x_fa.grad, x_lora.grad)
    assert fa.lora_A.weight.grad is None


def test_whole_model_saves_less_than_native_lora():
    b = batch()
    sizes = {}
    for name, m in [("lora", build_method("lora", backend="native", r=4, alpha=8, dropout=0.0,
                                          target_modules=TARGETS)), ("lora_fa", lora_fa())]:
        model = m.apply(tiny(), 0)
        sizes[name] = activation_bytes(functools.partial(lambda mod: mod(**b).loss, model),
                                       list(model.parameters()))[0]
    # Per layer LoRA keeps the q/v input (2 x 12 tokens x 32 wide); LoRA-FA does not.
    assert sizes["lora"] - sizes["lora_fa"] == 2 * (2 * 12 * 32 * 4)


def test_only_B_trains_and_A_stays_fixed():
    base = tiny()
    m = lora_fa()
    model = m.apply(copy.deepcopy(base), 0)
    layers = lora_layers(model)
    assert count_parameters(model)[0] == sum(4 * layer.out_features for layer in layers.values())
    assert all(n.endswith("lora_B.weight") for n, p in model.named_parameters() if p.requires_grad)
    a_before = {n: layer.lora_A.weight.clone() for n, layer in layers.items()}
    optimizer = torch.optim.AdamW(m.param_groups(model, lr=1e-2, weight_decay=0.0))
    for _ in range(2):
        model(**batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, layer in layers.items():
        assert torch.equal(layer.lora_A.weight, a_before[n])
        assert torch.count_nonzero(layer.lora_B.weight) > 0


def test_peft_optimizer_variant_steps_like_peft():
    base = tiny()
    reference = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    m = lora_fa(variant="peft_optimizer")
    model = m.apply(copy.deepcopy(base), 0)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            params[f"base_model.model.{name}.lora_B.default.weight"].normal_(std=0.1)
            for part in ("lora_A", "lora_B"):
                getattr(layer, part).weight.copy_(params[f"base_model.model.{name}.{part}.default.weight"])
    ref_opt = create_lorafa_optimizer(reference, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.0)
    opt = m.build_optimizer(model, lr=1e-2, weight_decay=0.0)
    assert isinstance(opt, LoraFAOptimizer)
    b = batch()
    for _ in range(2):
        for mod, o in ((reference, ref_opt), (model, opt)):
            mod(**b).loss.backward()
            o.step()
            o.zero_grad()
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, part).weight,
                                       params[f"base_model.model.{name}.{part}.default.weight"], atol=1e-5, rtol=0)


def test_module_uses_the_method_optimizer_hook():
    settings = OptimizerSettings(factory=functools.partial(torch.optim.AdamW), lr=1e-3)
    for variant, cls in (("peft_optimizer", LoraFAOptimizer), ("paper", torch.optim.AdamW)):
        m = lora_fa(variant=variant)
        module = FinetuneModule(m.apply(tiny(), 0), m, settings, SchedulerSettings(), total_steps=4)
        optimizer = module.configure_optimizers()["optimizer"]
        assert type(optimizer) is cls
        trainable = {id(p) for p in module.model.parameters() if p.requires_grad}
        assert trainable <= {id(p) for g in optimizer.param_groups for p in g["params"]}


def test_save_loads_in_plain_peft_as_lora(tmp_path):
    base = tiny()
    m = lora_fa()
    model = m.apply(copy.deepcopy(base), 0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.1)
    b = batch()
    with torch.no_grad():
        expected = model(**b).logits
    m.save(model, tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert loaded.peft_config["default"].peft_type.value == "LORA"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b).logits, expected, atol=1e-5, rtol=0)
    again = lora_fa().load(copy.deepcopy(base), tmp_path)
    assert all(not layer.lora_A.weight.requires_grad for layer in lora_layers(again).values())
    with torch.no_grad():
        torch.testing.assert_close(again(**b).logits, expected, atol=1e-5, rtol=0)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="method.variant"):
        lora_fa(variant="frobenius")
    with pytest.raises(ConfigError, match="method.r"):
        lora_fa(r=-1)
    with pytest.raises(ConfigError, match="method.dropout"):
        lora_fa(dropout=1.0)


class TinyForSequenceClassification(torch.nn.Module):
    """A body layer to adapt and a new classification head that trains whole."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 4)
        self.classifier = torch.nn.Linear(4, 2)


def test_peft_optimizer_group_names_scalings_and_settings_by_hand():
    m = build_method("lora_fa", r=2, alpha=8, target_modules=["body"], variant="peft_optimizer")
    model = m.apply(TinyForSequenceClassification(), 0)
    group = m.build_optimizer(model, lr=0.5, weight_decay=0.25).param_groups[0]
    # (A, B) of the one LoRA layer with s = alpha / r = 4, then the head's tensors, unscaled
    assert group["names"] == ["body.lora_A.weight", "body.lora_B.weight", "classifier.weight", "classifier.bias"]
    assert group["scaling_factors"] == [4.0, 4.0, None, None]
    assert [id(p) for p in group["params"]] == [id(model.body.lora_A.weight), id(model.body.lora_B.weight),
                                                id(model.classifier.weight), id(model.classifier.bias)]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.5, (0.9, 0.999), 0.25)
    assert build_method("lora_fa", target_modules=["body"]).build_optimizer(model, 0.5, 0.0) is None  # paper


def test_load_keeps_A_frozen(tmp_path):
    m = build_method("lora_fa", r=2, alpha=8, target_modules=["body"])
    m.save(m.apply(TinyForSequenceClassification(), 0), tmp_path)
    loaded = build_method("lora_fa", target_modules=["body"]).load(TinyForSequenceClassification(), tmp_path)
    layer = loaded.body
    assert isinstance(layer, LoraLinear) and (layer.r, layer.scaling) == (2, 4.0)
    assert not layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad


def test_dropout_reaches_the_layers_and_check_refuses_a_missing_target():
    m = build_method("lora_fa", r=2, alpha=8, dropout=0.25, target_modules=["body"])
    model = m.apply(TinyForSequenceClassification(), 0)
    assert isinstance(model.body.lora_dropout, torch.nn.Dropout) and model.body.lora_dropout.p == 0.25
    m.check(TinyForSequenceClassification())  # the target is there
    with pytest.raises(ConfigError, match="nowhere"):
        build_method("lora_fa", target_modules=["nowhere"]).check(TinyForSequenceClassification())
