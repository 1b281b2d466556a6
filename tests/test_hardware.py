"""Hardware: DDP on two CPU processes, impossible combinations, precision and checkpointing
options, the SLURM launcher config; GPU runs where CUDA is present."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY, assert_usage_error, run_cli

from ftlab.config import HardwareSettings
from ftlab.errors import ConfigError

PROBE = Path(__file__).resolve().parent / "probe"


# ------------------------------------------------------------------- DDP, two processes
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The real CLI with hardware=ddp on two CPU processes (gloo), observed by tests/probe."""
    root = tmp_path_factory.mktemp("ddp")
    run_dir, probe = root / "run", root / "probe"
    proc = run_cli("model=tiny-llama", "hardware=ddp", "hardware.devices=2", "hardware.accelerator=cpu",
                   "hardware.precision=32-true", "trainer.max_steps=3", "trainer.val_check_interval=3",
                   "eval.max_examples=2", "eval.before=false", "data.batch_size=4", "logger=csv",
                   "method.dropout=0", f"hydra.run.dir={run_dir}",
                   "+callbacks.probe._target_=ftlab_probe.ProbeCallback",
                   env={"FTLAB_PROBE_DIR": str(probe), "FTLAB_PROBE_RUN_DIR": str(run_dir),
                        "PYTHONPATH": os.pathsep.join([str(PROBE), os.environ.get("PYTHONPATH", "")])},
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(probe / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    writes = [json.loads(_wait_for(probe / f"rank{r}-writes.json").read_text()) for r in (0, 1)]
    return run_dir, ranks, writes, proc


def _wait_for(path: Path, seconds: float = 60) -> Path:
    """Rank 1 is a child process of rank 0's and may finish a moment after it."""
    import time

    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return path


def test_ddp_ranks_see_different_data(ddp_run):
    _, (r0, r1), _, _ = ddp_run
    assert r0["rank"] == 0 and r1["rank"] == 1 and r0["world_size"] == 2
    rows0, rows1 = {tuple(r) for r in r0["rows"]}, {tuple(r) for r in r1["rows"]}
    assert len(rows0) == len(r0["rows"]) == 12 and len(rows1) == 12  # 3 steps x 4 examples
    assert not rows0 & rows1, "both processes trained on the same examples"


def test_ddp_gradients_are_averaged_across_ranks(ddp_run):
    """After the first backward pass both ranks hold the gradient of the token-weighted loss
    over both ranks' batches, sum_r n_r L_r / (n_0 + n_1) (L_r: the mean loss of rank r's batch
    over its n_r scored tokens), recomputed here on a fresh copy of the model, and step to the
    same weights."""
    from ftlab.config import ModelSettings
    from ftlab.methods import build_method
    from ftlab.models import load_model

    _, (r0, r1), _, _ = ddp_run
    for name in r0["params_before"]:
        assert torch.equal(r0["params_before"][name], r1["params_before"][name])
    model, _ = load_model(ModelSettings(**_model_yaml("tiny-llama")), seed=42)  # the run's seed
    model = build_method("lora", r=8, alpha=16, dropout=0.0,
                         target_modules=["q_proj", "v_proj"]).apply(model, 3)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in r0["params_before"].items():
            named[name].copy_(value)
    local, scored = [], [int((rank["batch"]["labels"][:, 1:] != -100).sum()) for rank in (r0, r1)]
    for rank, count in zip((r0, r1), scored):
        model.zero_grad(set_to_none=True)
        (model(**rank["batch"]).loss * count / sum(scored)).backward()
        local.append({n: named[n].grad.clone() for n in r0["grads"]})
    assert r0["grads"].keys() == r1["grads"].keys() and r0["grads"]
    for name in r0["grads"]:
        mean = local[0][name] + local[1][name]
        assert torch.allclose(r0["grads"][name], mean, rtol=1e-4, atol=1e-7), name
        assert torch.equal(r0["grads"][name], r1["grads"][name]), name
    some_b = next(n for n in r0["grads"] if "lora_B" in n)
    assert not torch.allclose(local[0][some_b], local[1][some_b]), "the two batches gave one gradient"
    for name in r0["params_after"]:
        assert torch.equal(r0["params_after"][name], r1["params_after"][name]), name
    assert not torch.equal(r0["params_after"][some_b], r0["params_before"][some_b])


def test_ddp_only_rank_zero_writes_outputs(ddp_run):
    run_dir, _, (writes0, writes1), proc = ddp_run
    assert writes1 == [], f"rank 1 wrote {writes1}"
    for path in ("metrics.json", "config.yaml", "checkpoints/last.ckpt", "adapter", "logs/metrics.csv"):
        assert path in writes0 and (run_dir / path).exists(), path
    assert not list(run_dir.glob("*process_1*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["world_size"] == 2 and metrics["steps"] == 3
    assert proc.stdout.count("Result on the held-out split") == 1  # rank 1 prints nothing


# ------------------------------------------------------------------ refused combinations
@pytest.mark.parametrize("args,needles", [
    (["hardware=fsdp", "hardware.accelerator=cpu"], ["hardware.strategy=fsdp", "accelerator=gpu"]),
    (["hardware=deepspeed", "hardware.accelerator=cpu"], ["hardware.strategy=deepspeed", "needs"]),
    (["hardware.precision=16-mixed"], ["16-mixed", "not supported on CPU"]),
    (["hardware.strategy=ddp_spwn"], ["hardware.strategy='ddp_spwn'", "did you mean 'ddp_spawn'"]),
    (["hardware.devices=0"], ["hardware.devices must be"]),
    (["hardware=deepspeed", "+hardware.strategy_options.stage=4"], ["hardware.strategy_options.stage=4"]),
    (["hardware=ddp", "hardware.accelerator=cpu", "+hardware.strategy_options.x=1"],
     ["strategy_options is only read by fsdp and deepspeed"]),
])
def test_impossible_hardware_stops_before_loading(args, needles, tmp_path):
    message = refusal("model=tiny-llama", *args, tmp_path=tmp_path)
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without GPUs")
def test_gpu_hardware_without_a_gpu_says_so(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("model=tiny-llama", "hardware=gpu", f"hydra.run.dir={run_dir}")
    assert_usage_error(proc, "no CUDA GPU is visible", "dry_run=true")
    assert not run_dir.exists()
    for option in ("ddp", "fsdp", "deepspeed", "multinode"):
        assert "no CUDA GPU is visible" in refusal("model=tiny-llama", f"hardware={option}",
                                                   tmp_path=tmp_path)


@pytest.mark.parametrize("quantized", ["model.quantization=nf4", "method=qlora"])
def test_quantized_base_cannot_be_sharded_even_in_a_plan(quantized, tmp_path):
    message = refusal("model=tiny-llama", quantized, "hardware=fsdp", "dry_run=true", tmp_path=tmp_path)
    assert "nf4" in message and "fsdp" in message, message


def refusal(*args: str, tmp_path: Path) -> str:
    """The message the CLI stops with (exit status 2), from its own pre-flight, in-process."""
    from ftlab.cli import preflight
    from ftlab.errors import UserError

    with pytest.raises(UserError) as err:
        preflight([*args, f"hydra.run.dir={tmp_path / 'never'}"])
    assert not (tmp_path / "never").exists()
    return str(err.value)


def test_bf16_on_a_cpu_without_it_is_refused(monkeypatch):
    import ftlab.training.hardware as hw

    monkeypatch.setattr(hw, "cpu_supports_bf16", lambda: False)
    for precision in ("bf16-mixed", "bf16-true"):
        with pytest.raises(ConfigError, match="no native bf16 support"):
            hw.check_hardware(HardwareSettings(precision=precision))
        hw.check_hardware(HardwareSettings(precision=precision), here=False)  # a plan is fine
    hw.check_hardware(HardwareSettings(precision="32-true"))


def test_deepspeed_needs_its_package(monkeypatch):
    import importlib.util

    import ftlab.training.hardware as hw

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install deepspeed"):
        hw.check_hardware(HardwareSettings(accelerator="gpu", devices=2, strategy="deepspeed",
                                           precision="bf16-mixed", strategy_options={"stage": 3}))
    with pytest.raises(ConfigError, match="only 2 GPU"):
        hw.check_hardware(HardwareSettings(accelerator="gpu", devices=4, strategy="ddp"))


def test_rank_zero_from_the_launchers_environment(monkeypatch):
    from ftlab.console import is_rank_zero

    for var in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert is_rank_zero()
    for env, zero in [({"LOCAL_RANK": "1"}, False), ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
                      ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False), ({"RANK": "3"}, False),
                      ({"SLURM_PROCID": "0"}, True), ({"SLURM_PROCID": "2"}, False)]:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert is_rank_zero() is zero, env


# -------------------------------------------------------------- strategies, precision
def test_fsdp_wraps_each_decoder_layer():
    from lightning.pytorch.strategies import FSDPStrategy

    from ftlab.training.hardware import build_strategy

    model = _tiny_model()
    strategy = build_strategy(HardwareSettings(accelerator="gpu", strategy="fsdp",
                                               strategy_options={"sharding_strategy": "FULL_SHARD"}), model)
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert {c.__name__ for c in policy._module_classes} == {"LlamaDecoderLayer"}
    assert strategy.kwargs["use_orig_params"] is True
    assert build_strategy(HardwareSettings(strategy="ddp")) == "ddp"


def test_trainable_weights_stay_fp32_under_mixed_precision():
    from ftlab.training.hardware import keep_trainable_in_fp32, param_dtype

    model = _tiny_model().to(torch.bfloat16)
    model.model.norm.weight.requires_grad_(False)
    assert keep_trainable_in_fp32(model, "bf16-true") == 0
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    cast = keep_trainable_in_fp32(model, "bf16-mixed")
    assert cast == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.model.norm.weight.dtype == torch.bfloat16  # frozen: stays as loaded
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert param_dtype("32-true", torch.bfloat16, trainable=False) == torch.bfloat16
    assert param_dtype("16-true", torch.float32, trainable=True) == torch.float16


def test_gradient_checkpointing_same_gradients_less_saved_memory():
    """hardware.gradient_checkpointing recomputes each layer in backward: the gradients are
    the same and autograd keeps fewer bytes between forward and backward."""
    from ftlab.training.hardware import enable_gradient_checkpointing

    batch = {"input_ids": torch.randint(0, 272, (2, 64))}
    batch["labels"] = batch["input_ids"]
    results = []
    for checkpointing in (False, True):
        model = _tiny_model()
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.untyped_storage().nbytes()) or t, lambda t: t):
            loss = model(**batch).loss
        loss.backward()
        results.append((sum(saved), {n: p.grad for n, p in model.named_parameters()}))
    (plain, grads), (ckpt, grads_ckpt) = results
    assert ckpt < plain / 2, (ckpt, plain)
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], atol=1e-6), name


class RunProbe(L.Callback):
    """Added to the run below as a user callback (``+callbacks``): records, per training batch,
    whether each decoder layer of the model being trained recomputes itself in backward, and
    counts the optimizer steps."""

    batches: list[list[bool]] = []
    optimizer_steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in pl_module.modules() if isinstance(m, GradientCheckpointingLayer)]
        RunProbe.batches.append([bool(m.gradient_checkpointing and m.training) for m in layers])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        RunProbe.optimizer_steps.append(trainer.global_step)


def test_gradient_checkpointing_and_accumulation_in_a_run(tmp_path):
    """The run (in this process, the real pipeline) checkpoints both decoder layers of the tiny
    Llama and steps the optimizer once per two micro-batches."""
    from tiny_runs import train_run

    RunProbe.batches.clear()
    RunProbe.optimizer_steps.clear()
    metrics = train_run(tmp_path / "run", "hardware.gradient_checkpointing=true",
                        "trainer.accumulate_grad_batches=2", "trainer.max_steps=2", "eval.generate=false",
                        f"+callbacks.probe._target_={__name__}.RunProbe")
    assert RunProbe.batches == 4 * [[True, True]]  # 2 steps x 2 micro-batches, 2 layers each
    assert RunProbe.optimizer_steps == [0, 1]
    assert metrics["steps"] == 2
    # One token-weighted loss per optimizer step (each the mean over its two micro-batches).
    assert [step for step, _ in metrics["train_loss_history"]] == [1, 2]


# --------------------------------------------------------------------- SLURM launcher
def test_slurm_launcher_follows_the_hardware_group():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ftlab.settings import config_dir

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for overrides, expected in [(["hardware=ddp", "hardware.devices=4", "hardware.num_nodes=2"], (4, 4, 2)),
                                    (["hardware=cpu"], (0, 1, 1)), (["hardware=multinode"], (8, 8, 2))]:
            cfg = compose("train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
            launcher = cfg.hydra.launcher
            got = tuple(OmegaConf.select(launcher, k) for k in ("gpus_per_node", "tasks_per_node", "nodes"))
            assert got == expected, overrides
            assert launcher._target_.endswith("SlurmLauncher")


def test_slurm_launcher_needs_a_number_of_devices(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    message = refusal("-m", "hydra/launcher=slurm", "hardware=fsdp", "model=tiny-llama",
                      tmp_path=tmp_path)
    for needle in ("hydra.launcher.gpus_per_node", "hardware.devices", "'auto'"):
        assert needle in message, message


# --------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("option", ["gpu", "fsdp"])
def test_gpu_run(option, tmp_path):
    """One GPU with bf16 autocast, and FSDP on one GPU (its wrapping and full-state saving)."""
    run_dir = tmp_path / option
    proc = run_cli(*TINY, f"hardware={option}", "hardware.devices=1", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and (run_dir / "adapter" / "adapter_config.json").is_file()


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=272, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2))


def _model_yaml(name: str) -> dict:
    import yaml

    from ftlab.settings import config_dir

    return yaml.safe_load((config_dir() / "model" / f"{name}.yaml").read_text())
