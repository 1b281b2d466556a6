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
