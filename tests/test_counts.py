"""The parameter summary printed at the start of every run, and the same warning in the
dry-run plan: a parameter-efficient method that trains more than 5% of the model."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli

from ftlab.training.hardware import keep_trainable_in_fp32
from ftlab.methods import build_method, count_parameters
from ftlab.models import load_model
from ftlab.planning.counts import parameter_summary


def tiny_lora(precision: str, r: int = 2, targets=("q_proj",)):
    from methods.tiny import tiny_settings

    model, _ = load_model(tiny_settings(), seed=0)
    model.to(torch.bfloat16)  # a bf16 checkpoint
    method = build_method("lora", r=r, alpha=4, dropout=0.0, target_modules=list(targets))
    model = method.apply(model, 10)
    keep_trainable_in_fp32(model, precision)
    return model, method


@pytest.mark.parametrize("precision,line", [
    ("bf16-mixed", "held in (bf16-mixed): trainable float32, frozen bfloat16"),  # fp32 masters, bf16 base
    ("bf16-true", "held in (bf16-true): trainable bfloat16, frozen bfloat16"),  # Lightning casts everything
    ("32-true", "held in (32-true): trainable float32, frozen bfloat16"),
])
def test_summary_says_which_dtype_trainable_and_frozen_are_held_in(precision, line):
    model, method = tiny_lora(precision)
    summary = parameter_summary(model, "lora", method, precision)
    assert line in summary.splitlines()[1], summary


def test_summary_warns_when_a_parameter_efficient_method_trains_over_5_percent():
    model, method = tiny_lora("bf16-mixed", r=16, targets=("q_proj", "v_proj"))
    trainable, total = count_parameters(model)
    assert trainable > 0.05 * total  # 7,168 of the tiny model's 109,376
    assert f"Warning: method lora trains {100 * trainable / total:.1f}% of the model's parameters" \
        in parameter_summary(model, "lora", method, "bf16-mixed")
    model, method = tiny_lora("bf16-mixed")
    assert count_parameters(model)[0] < 0.05 * total
    assert "Warning" not in parameter_summary(model, "lora", method, "bf16-mixed")
    full = build_method("full")
    model = full.apply(model, 10)
    assert "Warning" not in parameter_summary(model, "full", full, "bf16-mixed")


def test_dry_run_warns_for_prefix_tuning_on_llama2_7b_and_not_for_lora(tmp_path):
    """Prefix tuning's reparameterisation MLP trains 1,090,867,200 of Llama-2-7B's parameters
    (14%); LoRA on q, v about 0.06%. One process plans both (a multirun)."""
    proc = run_cli("-m", "model=llama2-7b", "method=prefix_tuning,lora", "dry_run=true", "data.batch_size=1",
                   "data.max_length=16", f"hydra.sweep.dir={tmp_path}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plans = {block.split(",")[1].split()[-1]: block for block in proc.stdout.split("Plan: ")[1:]}
    assert set(plans) == {"prefix_tuning", "lora"}, proc.stdout
    assert "trainable 1,090,867,200 / total" in plans["prefix_tuning"]
    assert "Warning: method prefix_tuning trains 13.9% of the model's parameters" in plans["prefix_tuning"]
    assert "Warning" not in plans["lora"]


# -- module types and per-module rows, on names and a model worked out by hand ---------------
@pytest.mark.parametrize("name,expected", [
    # peft's wrapper prefix, a layer index and ".default" go; the tensor's own name goes
    ("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight",
     "model.layers.*.self_attn.q_proj.lora_A"),
    ("base_model.classifier.bias", "classifier"),  # the shorter prefix (a prompt-learning model)
    ("base_model.model.base_model.x.weight", "base_model.x"),  # only one prefix is dropped
    ("transformer.h.11.mlp.c_fc.weight", "transformer.h.*.mlp.c_fc"),
    ("transformer.h.11", "transformer.h.*"),  # an index at the end folds too
    ("model.layer10.weight", "model.layer10"),  # digits inside a name are not an index
    ("model.layers.0.self_attn.q_proj.vera_lambda_b", "model.layers.*.self_attn.q_proj.vera_lambda_b"),
    ("model.embed_tokens.weight", "model.embed_tokens"),
    ("model.defaults.weight", "model.defaults"),  # ".default" only as a whole path part
])
def test_module_type_folds_indices_and_drops_wrappers(name, expected):
    from ftlab.planning.counts import module_type

    assert module_type(name) == expected


class _Layers(torch.nn.Module):
    """layers.0 (3 -> 2, trains), layers.1 (3 -> 2, frozen), head (2 -> 4, no bias, trains),
    tied: the head's weight again (counted once)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)])
        self.head = torch.nn.Linear(2, 4, bias=False)
        self.tied = torch.nn.Linear(2, 4, bias=False)
        self.tied.weight = self.head.weight
        self.layers[1].requires_grad_(False)


def test_parameters_by_module_counts_tensors_params_and_trainable_in_model_order():
    from ftlab.planning.counts import parameters_by_module

    # layers.*: weights 2x3 + biases 2, twice = 4 tensors, 16 params, 8 of them in layers.0;
    # head: one 4x2 weight (the tied copy is the same tensor).
    assert parameters_by_module(_Layers()) == [
        {"module": "layers.*", "tensors": 4, "params": 16, "trainable": 8},
        {"module": "head", "tensors": 1, "params": 8, "trainable": 8},
    ]
    assert parameters_by_module(_Layers(), trainable_only=True) == [
        {"module": "layers.*", "tensors": 2, "params": 8, "trainable": 8},
        {"module": "head", "tensors": 1, "params": 8, "trainable": 8},
    ]


def _method(parameter_efficient: bool):
    from types import SimpleNamespace

    return SimpleNamespace(traits=SimpleNamespace(parameter_efficient=parameter_efficient))


def test_share_warning_starts_above_5_percent_and_names_the_share():
    from ftlab.planning.counts import share_warning

    assert share_warning(_method(True), "m", 5, 100) is None  # exactly 5%: no warning
    assert share_warning(_method(False), "full", 100, 100) is None
    assert "trains 100.0% of the model's parameters" in share_warning(_method(True), "m", 1, 1)  # not 50%
    assert share_warning(_method(True), "m", 6, 100) == (
        "Warning: method m trains 6.0% of the model's parameters, more than 5%: not parameter-efficient "
        "at this size (see the trainable module types)")


def test_summary_of_a_hand_counted_model():
    from ftlab.planning.counts import parameter_summary

    # 8 + 8 trainable of 16 + 8 = 24 parameters: 66.6667%.
    assert parameter_summary(_Layers(), "m") == "\n".join([
        "Parameters (m): trainable 16 / total 24 (66.6667%)",
        "  trainable module type tensors        params",
        "  layers.*                    2             8",
        "  head                        1             8",
    ])
    one = torch.nn.Linear(1, 1, bias=False)  # one parameter: 100%, not 50%
    assert parameter_summary(one, "m").splitlines()[0] == "Parameters (m): trainable 1 / total 1 (100.0000%)"
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    assert parameter_summary(frozen, "none") == "Parameters (none): trainable 0 / total 6 (0.0000%)"


def test_held_dtypes_of_int_and_empty_groups():
    from ftlab.planning.counts import held_dtypes

    model = torch.nn.Linear(2, 2).requires_grad_(False)
    model.steps = torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
    # frozen float32 base and an int64 tensor kept as it is; nothing trains: "-"
    assert held_dtypes(model, "bf16-mixed") == "trainable -, frozen float32 + int64"
    # under *-true every floating tensor is cast to the half type, ints are not
    assert held_dtypes(model, "bf16-true") == "trainable -, frozen bfloat16 + int64"
    # a meta-device model built in fp32 that loads in bf16: its frozen tensors are held in bf16
    model.bias.requires_grad_(True)
    assert held_dtypes(model, "32-true", loaded=torch.bfloat16) == "trainable float32, frozen bfloat16 + int64"
