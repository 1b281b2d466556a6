"""The real command line, in a subprocess: runs, outputs, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, TINY_LLAMA_PARAMS, assert_usage_error, run_cli, tiny_lora_params

REQUIRED_METRICS = {"val_loss_initial", "val_loss", "trainable_params", "total_params",
                    "tokens_per_second", "peak_memory_mb", "wall_time_s"}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[Path, object]:
    run_dir = tmp_path_factory.mktemp("runs") / "lora"
    proc = run_cli(*TINY, "logger=csv", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_smoke_run_writes_everything(lora_run):
    run_dir, proc = lora_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert REQUIRED_METRICS <= set(metrics)
    assert metrics["status"] == "completed" and metrics["steps"] == 3
    # conf/method/lora.yaml: r=8 on the tiny Llama's q_proj and v_proj (formula in conftest.py).
    assert metrics["trainable_params"] == tiny_lora_params(8) == 3584
    assert metrics["total_params"] == TINY_LLAMA_PARAMS + tiny_lora_params(8)
    assert metrics["tokens_per_second"] > 0 and metrics["peak_memory_mb"] > 0
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "logs" / "metrics.csv").is_file()
    # The parameter summary and the held-out result are printed.
    assert "Parameters (lora): trainable" in proc.stdout
    assert "q_proj.lora_A" in proc.stdout
    assert "Result on the held-out split" in proc.stdout


def test_resolved_config_has_no_interpolations(lora_run):
    run_dir, _ = lora_run
    text = (run_dir / "config.yaml").read_text()
    assert "${" not in text
    assert "target_modules:\n  - q_proj\n  - v_proj" in text


def test_adapter_loads_in_plain_peft(lora_run):
    """The saved adapter is peft's format: plain transformers + peft load it, no ftlab."""
    import torch
    from peft import PeftModel

    from ftlab.config import ModelSettings
    from ftlab.models import load_model

    run_dir, _ = lora_run
    base, tok = load_model(ModelSettings(**_model_yaml("tiny-llama")), seed=42)
    ids = tok("### Instruction:\nhi\n\n### Response:\n", return_tensors="pt")
    with torch.no_grad():
        before = base(**ids).logits.clone()
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    model.eval()
    with torch.no_grad():
        after = model(**ids).logits
        assert not torch.allclose(after, before, atol=1e-4), "the adapter changed no output"
        with model.disable_adapter():  # the base under the adapter is the run's (seed 42) base
            torch.testing.assert_close(model(**ids).logits, before, rtol=0, atol=0)
    trained_B = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in trained_B), "lora_B stayed zero: nothing was trained"


def test_checkpoint_holds_only_trainable_parameters(lora_run):
    import torch

    run_dir, _ = lora_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k for k in keys), keys[:5]
    assert "optimizer_states" in ckpt and "method_state" in ckpt


def test_full_finetuning_saves_a_complete_model(tmp_path):
    run_dir = tmp_path / "full"
    proc = run_cli(*TINY, "method=full", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["trainable_params"] == metrics["total_params"] == TINY_LLAMA_PARAMS
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert sum(p.numel() for p in model.parameters()) == metrics["total_params"]


@pytest.mark.parametrize("logger,produced", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                             ("none", None)])
def test_logger_options(logger, produced, tmp_path):
    run_dir = tmp_path / logger
    proc = run_cli(*TINY[:-1], f"logger={logger}", f"hydra.run.dir={run_dir}",
                   env={"WANDB_API_KEY": "", "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    if produced:
        assert any((run_dir / produced).rglob("*")), list(run_dir.iterdir())
    assert (run_dir / "metrics.json").is_file()


def test_trainer_settings_live_under_trainer(tmp_path):
    run_dir = tmp_path / "steps"
    proc = run_cli(*TINY, "trainer.max_steps=5", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 5


def test_multirun_gives_each_job_its_own_directory(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *TINY, "method.r=2,4", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(sweep.glob("*/metrics.json"))
    assert len(results) == 2
    # Each job trained its own rank: r * (d_in + d_out) per adapted layer (conftest.py).
    counts = sorted(json.loads(p.read_text())["trainable_params"] for p in results)
    assert counts == [tiny_lora_params(2), tiny_lora_params(4)] == [896, 1792]


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args,needles", [
    (["method=lorra"], ["unknown method 'lorra'", "did you mean 'lora'", "full"]),
    (["model=llama-99b"], ["unknown model 'llama-99b'", "tiny-llama"]),
    (["trainer.max_stepz=3"], ["trainer.max_stepz", "did you mean 'trainer.max_steps'"]),
    (["method.rank=4"], ["method.rank"]),
    (["method.r=0"], ["method.r must be a positive integer, got 0"]),
    (["method.r=-3"], ["method.r must be a positive integer, got -3"]),
    (["optimizer.lr=0"], ["optimizer.lr must be a positive number, got 0"]),
    (["optimizer.lr=-1e-4"], ["optimizer.lr must be a positive number"]),
    (["method.target_modules=[qproj]"],
     ["method.target_modules", "'qproj' matches no module", "did you mean 'q_proj'"]),
    (["data.path=/nonexistent/train.jsonl"], ["/nonexistent/train.jsonl does not exist"]),
    (["trainer.max_steps=0"], ["trainer.max_steps must be a positive integer"]),
    (["hardware.precision=fp8"], ["hardware.precision='fp8' is not valid"]),
])
def test_bad_input_stops_before_loading_with_status_2(args, needles, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("model=tiny-llama", *args, f"hydra.run.dir={run_dir}")
    assert_usage_error(proc, *needles)
    assert not run_dir.exists(), "a run directory was created for a run that never started"


def test_missing_weights_of_a_large_model_say_where_to_point(tmp_path):
    proc = run_cli("model=llama2-7b", f"hydra.run.dir={tmp_path / 'run'}",
                   env={"HF_HOME": str(tmp_path / "hf")})
    assert_usage_error(proc, "meta-llama/Llama-2-7b-hf", "model.path=", "Hugging Face cache")


def test_existing_run_directory_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"precious": true}')
    proc = run_cli(*TINY, f"hydra.run.dir={run_dir}")
    assert_usage_error(proc, str(run_dir), "already exists")
    assert (run_dir / "metrics.json").read_text() == '{"precious": true}'
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.json"]


def _model_yaml(name: str) -> dict:
    import yaml

    from ftlab.settings import config_dir

    return yaml.safe_load((config_dir() / "model" / f"{name}.yaml").read_text())


def test_a_run_reproduces_from_its_saved_config(lora_run, tmp_path):
    """``-cd <run> -cn config`` reruns the resolved config: same data, same numbers."""
    first_dir, _ = lora_run
    again = tmp_path / "again"
    proc = run_cli("-cd", str(first_dir), "-cn", "config", f"hydra.run.dir={again}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((first_dir / "metrics.json").read_text())
    second = json.loads((again / "metrics.json").read_text())
    for key in ("val_loss_initial", "val_loss", "trainable_params", "steps"):
        assert second[key] == first[key], key
    assert second["train_loss_history"] == first["train_loss_history"]
