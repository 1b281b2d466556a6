"""The dry-run planner: parameter counts against counts computed here from the architecture,
memory against the allocator's measured peak of real training steps, the CLI and plan.json."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import run_cli

from ftlab.settings import config_dir, settings_from_config
from ftlab.planning.planner import GIB, QUANT_BYTES, plan_run, write_plan
from ftlab.planning.trace import estimate_step, trace_training_step
from ftlab.report import plans_table as summarize


def settings(*overrides: str, run_dir: str = "/tmp/ftlab-plan-unused"):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["dry_run.enabled=true",
                                          *overrides], return_hydra_config=True)
    return settings_from_config(cfg, run_dir)


def arch(model: str) -> dict:
    return yaml.safe_load((config_dir() / "model" / f"{model}.yaml").read_text())["arch"]


def decoder_counts(a: dict) -> dict[str, int]:
    """Parameters of a Llama/Mistral decoder from its hyperparameters (no model built)."""
    h, i, n, v = a["hidden_size"], a["intermediate_size"], a["num_hidden_layers"], a["vocab_size"]
    hd = a.get("head_dim") or h // a["num_attention_heads"]
    q, kv = a["num_attention_heads"] * hd, a["num_key_value_heads"] * hd
    per_layer = {"q_proj": h * q, "k_proj": h * kv, "v_proj": h * kv, "o_proj": q * h,
                 "gate_proj": h * i, "up_proj": h * i, "down_proj": i * h, "norms": 2 * h}
    embed = v * h
    head = 0 if a.get("tie_word_embeddings") else v * h
    total = embed + n * sum(per_layer.values()) + h + head
    linear = n * sum(x for k, x in per_layer.items() if k != "norms")
    return {"total": total, "linear": linear, "embed": embed, "head": head, "layers": n,
            "q_in": h, "q_out": q, "v_out": kv, "norms": n * 2 * h + h}


# --------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("model", ["llama2-7b", "llama2-13b", "llama3-8b", "mistral-7b", "tiny-llama"])
def test_counts_match_the_architecture(model):
    c = decoder_counts(arch(model))
    full = plan_run(settings(f"model={model}", "method=full"))
    assert full.total_params == full.trainable_params == c["total"]
    r = 8
    lora = plan_run(settings(f"model={model}", "method=lora", f"method.r={r}",
                             "method.target_modules=[q_proj,v_proj]"))
    expected = c["layers"] * r * ((c["q_in"] + c["q_out"]) + (c["q_in"] + c["v_out"]))
    assert lora.trainable_params == expected
    assert lora.total_params == c["total"] + expected
    rows = {row["module"]: row for row in lora.modules}
    assert rows["model.layers.*.self_attn.q_proj.lora_A"]["trainable"] == c["layers"] * r * c["q_in"]
    assert rows["model.layers.*.self_attn.v_proj.lora_B"]["trainable"] == c["layers"] * r * c["v_out"]
    assert rows["model.layers.*.self_attn.k_proj"]["trainable"] == 0
    assert sum(row["params"] for row in lora.modules) == lora.total_params


def test_llama2_7b_lora_is_the_published_number():
    plan = plan_run(settings("model=llama2-7b", "method=lora", "method.r=8"))
    assert plan.trainable_params == 4_194_304 and plan.total_params == 6_742_609_920


# ----------------------------------------------------------------------- memory formulas
def test_weights_gradients_states_follow_the_formulas():
    """llama2-7b: full fine-tuning holds fp32 weights, gradients and two Adam states under
    mixed precision, half of everything under bf16-true; an nf4 base takes 0.516 bytes per
    weight of every linear layer but the head."""
    c = decoder_counts(arch("llama2-7b"))
    p = c["total"]
    mixed = plan_run(settings("model=llama2-7b", "method=full", "hardware=gpu")).memory[0]
    assert (mixed.weights, mixed.gradients, mixed.optimizer_states) == (4 * p, 4 * p, 8 * p)
    true = plan_run(settings("model=llama2-7b", "method=full", "hardware=gpu",
                             "hardware.precision=bf16-true")).memory[0]
    assert (true.weights, true.gradients, true.optimizer_states) == (2 * p, 2 * p, 4 * p)
    assert true.peak < mixed.peak
    sgd = plan_run(settings("model=llama2-7b", "method=full", "optimizer=sgd",
                            "hardware.precision=bf16-true")).memory[0]
    assert sgd.optimizer_states == 2 * p  # one momentum buffer

    lora = plan_run(settings("model=llama2-7b", "method=lora", "method.r=8", "hardware=gpu",
                             "model.quantization=nf4")).memory[0]
    adapters = c["layers"] * 8 * (2 * c["q_in"] + c["q_out"] + c["v_out"])
    not_quantized = c["embed"] + c["head"] + c["norms"]
    expected = math.ceil(c["linear"] * QUANT_BYTES["nf4"]) + 2 * not_quantized + 4 * adapters
    assert abs(lora.weights - expected) <= c["linear"] // 4096  # per-layer rounding
    assert lora.gradients == 4 * adapters and lora.optimizer_states == 8 * adapters


def test_sharding_divides_what_it_shards():
    base = ["model=llama2-7b", "method=full", "hardware.precision=bf16-true"]
    one = plan_run(settings(*base, "hardware=gpu")).memory[0]
    fsdp = plan_run(settings(*base, "hardware=fsdp", "hardware.devices=8")).memory[0]
    zero2 = plan_run(settings(*base, "hardware=deepspeed", "hardware.devices=8")).memory[0]
    assert fsdp.weights == math.ceil(one.weights / 8) and fsdp.gradients == math.ceil(one.gradients / 8)
    assert fsdp.optimizer_states == math.ceil(one.optimizer_states / 8)
    assert zero2.weights == one.weights and zero2.optimizer_states == math.ceil(one.optimizer_states / 8)
    assert fsdp.activations == one.activations  # each device runs its own micro-batch
    assert fsdp.peak < zero2.peak < one.peak


def test_checkpointing_and_batch_shape_move_the_activations():
    small = plan_run(settings("model=llama2-7b", "method=lora", "hardware=gpu", "data.batch_size=1"))
    big = plan_run(settings("model=llama2-7b", "method=lora", "hardware=gpu", "data.batch_size=4"))
    no_ckpt, ckpt = big.memory
    assert ckpt.activations < no_ckpt.activations / 5 and ckpt.peak < no_ckpt.peak
    assert abs(big.memory[0].activations / small.memory[0].activations - 4) < 0.05


@pytest.mark.parametrize("case", [["method=lora"], ["method=full", "hardware.precision=bf16-mixed"],
                                  ["method=prompt_tuning"]])
def test_two_traced_layers_give_the_whole_depth(case):
    """estimate_step (traces of 2 and 3 layers, extended) against a trace of all 8 layers."""
    s = settings("model=tiny-llama", "model.arch.num_hidden_layers=8", *case,
                 "data.batch_size=2", "data.max_length=64")
    for checkpointing in (False, True):
        (peak, act), (full_peak, full_act) = (f(s, checkpointing=checkpointing)
                                              for f in (estimate_step, trace_training_step))
        assert abs(act - full_act) <= 8 and abs(peak - full_peak) <= 1e-3 * full_peak, checkpointing


# ------------------------------------------------------- estimate against a measured run
MEASURED = ["model=tiny-llama", "model.arch.hidden_size=128", "model.arch.intermediate_size=344",
            "model.arch.num_hidden_layers=4", "model.arch.vocab_size=2048",
            "model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=4",
            "data.batch_size=4", "data.max_length=128", "trainer.max_steps=2", "logger=none",
            "checkpoint.every_n_steps=null", "+trainer.enable_checkpointing=false",
            "trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("case", [
    ["method=full"],
    ["method=lora", "method.target_modules=all-linear", "hardware.precision=bf16-mixed"],
    ["method=lora", "hardware.gradient_checkpointing=true"],
])
def test_estimate_is_within_25_percent_of_the_measured_peak(case):
    """Peak tensor memory of two real training steps (ftlab's model loading, method, module
    and Trainer, full-length batches) on CPU, measured from the allocator's own record of
    every allocation and free (torch.profiler with profile_memory): the CPU counterpart of
    torch.cuda.max_memory_allocated. RSS would add the Python and torch runtime, which the
    planner does not (and should not) estimate."""
    from ftlab.training.hardware import cpu_supports_bf16

    s = settings(*MEASURED, *case)
    if "bf16" in str(s.hardware.precision) and not cpu_supports_bf16():
        pytest.skip("this CPU has no bf16")
    plan = plan_run(s)
    estimate = plan.memory[1 if s.hardware.gradient_checkpointing else 0].peak
    measured = measured_peak(s)
    assert abs(estimate - measured) <= 0.25 * measured, (estimate / 2**20, measured / 2**20)


def _train_steps(s) -> None:
    """``trainer.max_steps`` steps of ftlab's own training path on full-length random batches."""
    from ftlab.training.hardware import enable_gradient_checkpointing, keep_trainable_in_fp32
    from ftlab.models import load_model
    from ftlab.training.module import FinetuneModule
    from ftlab.run import _trainer, preflight

    method = preflight(s)
    b, n, vocab = s.data.batch_size, s.data.max_length, s.model.arch["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(s.max_steps):
        ids = torch.randint(0, vocab, (b, n), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones(b, n, dtype=torch.long),
                        "labels": ids.clone()})
    model, _ = load_model(s.model, seed=0)
    if s.hardware.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = method.apply(model, s.max_steps)
    keep_trainable_in_fp32(model, s.hardware.precision)
    module = FinetuneModule(model, method, s.optimizer, s.scheduler, s.max_steps)
    trainer = _trainer(s, s.run_dir, False, model)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))


def measured_peak(s) -> int:
    """Peak bytes of live tensors while :func:`_train_steps` runs, from the profiler's record
    of every allocation and free of torch's CPU allocator."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    # Tensors of earlier tests that only the cycle collector frees would otherwise be freed
    # inside the profile, as frees without allocations, and lower the measured peak.
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _train_steps(s)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [["method=full"], ["method=lora", "hardware.gradient_checkpointing=true"]])
def test_estimate_on_a_gpu(case):
    """The same comparison on a GPU, against torch.cuda.max_memory_allocated, with a model
    large enough (about 100M parameters, batch 8 x 512) that cuBLAS's workspace is noise."""
    s = settings("model=tiny-llama", "model.arch.hidden_size=1024", "model.arch.intermediate_size=2816",
                 "model.arch.num_hidden_layers=6", "model.arch.vocab_size=32000",
                 "model.arch.num_attention_heads=16", "model.arch.num_key_value_heads=16",
                 "data.batch_size=8", "data.max_length=512", "trainer.max_steps=2", "logger=none",
                 "checkpoint.every_n_steps=null", "+trainer.enable_checkpointing=false",
                 "trainer.enable_progress_bar=false", "hardware=gpu", *case)
    estimate = plan_run(s).memory[1 if s.hardware.gradient_checkpointing else 0].peak
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _train_steps(s)
    measured = torch.cuda.max_memory_allocated() - base
    assert abs(estimate - measured) <= 0.25 * measured, (estimate / 2**20, measured / 2**20)


# ------------------------------------------------------------------------ CLI, plan.json
def test_dry_run_of_a_7b_model_needs_no_weights_and_no_data(tmp_path):
    """A sweep of dry runs: each job plans, writes plan.json (integers), no metrics.json; the
    weights (not on this machine) and the data file (absent) are never touched."""
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "model=llama2-7b", "method=full,lora", "hardware=gpu", "dry_run=true",
                   "dry_run.device_memory_gb=40", "data.path=/nonexistent/train.jsonl",
                   f"hydra.sweep.dir={sweep}", env={"HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    plans = {json.loads(p.read_text())["method"]: json.loads(p.read_text())
             for p in sweep.glob("*/plan.json")}
    assert set(plans) == {"full", "lora"} and not list(sweep.glob("*/metrics.json"))
    c = decoder_counts(arch("llama2-7b"))
    assert plans["full"]["trainable_params"] == plans["full"]["total_params"] == c["total"]
    assert isinstance(plans["lora"]["trainable_params"], int)
    assert plans["full"]["memory"]["without_checkpointing"]["fits"] is False
    assert plans["lora"]["memory"]["with_checkpointing"]["fits"] is True
    assert "Memory per device (GiB)" in proc.stdout and "does NOT fit" in proc.stdout
    table = summarize(sweep)
    assert "| full | bf16-mixed |" in table and "| lora | bf16-mixed |" in table


def test_plan_json_and_verdict(tmp_path):
    plan = plan_run(settings("model=tiny-llama", "method=lora", "dry_run.device_memory_gb=1"))
    out = write_plan(plan, tmp_path)
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved == json.loads(json.dumps(out))
    assert type(saved["trainable_params"]) is int and type(saved["total_params"]) is int
    assert saved["memory"]["without_checkpointing"]["fits"] is True
    assert saved["memory"]["without_checkpointing"]["peak"] < GIB
    assert "fits" in plan.table() and "module type" in plan.table()


def test_eight_bit_adamw_states_take_about_a_quarter():
    """bitsandbytes' AdamW8bit: 2 x (1 + 4/256) bytes per trainable value of a large tensor,
    fp32 states below min_8bit_size (LoRA on Llama-2-7B: every A and B has >= 4096 values)."""
    adamw = plan_run(settings("model=llama2-7b", "method=lora", "optimizer=adamw"))
    eight = plan_run(settings("model=llama2-7b", "method=lora", "optimizer=adamw8bit"))
    n = adamw.trainable_params
    assert adamw.memory[0].optimizer_states == n * 2 * 4
    assert eight.memory[0].optimizer_states == math.ceil(n * 2 * (1 + 4 / 256))
    tiny = plan_run(settings("model=tiny-llama", "method=lora", "method.r=2", "optimizer=adamw8bit"))
    assert tiny.memory[0].optimizer_states == tiny.trainable_params * 2 * 4  # 128-value tensors: fp32


def test_chunked_loss_removes_the_logits_from_the_plan():
    """SmolLM2 (vocabulary 49,152, hidden 576), LoRA, 8 x 240 tokens: the plain loss keeps the
    fp32 log-softmax of the shifted logits, [B (T - 1), V], for backward; the chunked loss keeps
    only the hidden states it reads, [B (T - 1), H], and one chunk of 1024 x V logits lives
    only inside the loss. The peak drops by at least the logits too."""
    b, t, v, h = 8, 240, 49152, 576
    shape = ("model=smollm2-135m", "method=lora", f"data.batch_size={b}", f"data.max_length={t}")
    plain = plan_run(settings(*shape, "loss.chunk_size=0")).memory[0]
    chunked = plan_run(settings(*shape, "loss.chunk_size=1024")).memory[0]
    logits, hidden = 4 * b * (t - 1) * v, 4 * b * (t - 1) * h
    assert plain.activations - chunked.activations == pytest.approx(logits - hidden, rel=1e-3)
    assert plain.peak - chunked.peak >= logits


@pytest.mark.parametrize("precision,held", [
    ("32-true", "trainable float32, frozen bfloat16"),     # a bf16 checkpoint's frozen weights stay bf16
    ("bf16-mixed", "trainable float32, frozen bfloat16"),  # fp32 masters for what trains
    ("bf16-true", "trainable bfloat16, frozen bfloat16"),  # everything in the half type
])
def test_the_plan_says_which_dtype_each_part_is_held_in(precision, held):
    plan = plan_run(settings("model=tiny-llama", "model.dtype=bfloat16", f"hardware.precision={precision}"))
    assert plan.held_in == held
    assert f"held in ({precision}): {held}" in plan.table()
