"""Training controls: the best checkpoint next to the last, early stopping, and the checks that
refuse a monitor or a schedule that cannot work, before training."""

from __future__ import annotations

import json
import math

import pytest

from conftest import TINY, assert_usage_error, run_cli

# A learning rate too large for the tiny model: validation loss falls for a few steps, then
# rises, so the best validation is not the last one.
DIVERGING = [*TINY, "trainer.max_steps=60", "trainer.val_check_interval=3", "optimizer.lr=3.0",
             "scheduler.name=constant", "checkpoint.every_n_steps=null"]


def metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    run = tmp_path_factory.mktemp("early") / "run"
    proc = run_cli(*DIVERGING, "monitor.patience=2", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run, proc


def test_early_stopping_stops_after_patience_validations_without_improvement(stopped):
    run, proc = stopped
    m = metrics(run)
    losses = [(h["step"], h["val_loss"]) for h in m["val_history"] if h["step"] > 0]
    best_i = min(range(len(losses)), key=lambda i: losses[i][1])
    # Stopped exactly `patience` validations after the best one, well before max_steps.
    assert len(losses) - 1 - best_i == 2, losses
    assert m["steps"] == losses[-1][0] < 60
    assert m["best"]["stopped_early"] is True
    assert "stopped early" in proc.stdout


def test_best_checkpoint_is_the_best_validation_and_its_adapter_is_kept(stopped):
    run, _ = stopped
    m = metrics(run)
    history = [h for h in m["val_history"] if h["step"] > 0]
    best = min(history, key=lambda h: h["val_loss"])
    assert m["best"]["step"] == best["step"] < m["best"]["last_step"]
    assert math.isclose(m["best"]["value"], best["val_loss"], rel_tol=1e-6)
    assert (run / m["best"]["checkpoint"]).is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert m["best"]["adapter"] == "best_adapter"
    assert (run / "best_adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_config.json").is_file()  # the last one, as always


def test_eval_best_reproduces_the_best_validation(stopped):
    run, _ = stopped
    proc = run_cli(str(run), "--best", f"--json={run}/best_eval.json", module="ftlab.eval")
    assert proc.returncode == 0, proc.stderr[-2000:]
    scored = json.loads((run / "best_eval.json").read_text())
    assert math.isclose(scored["val_loss"], metrics(run)["best"]["value"], rel_tol=1e-5)
    last = run_cli(str(run), f"--json={run}/last_eval.json", module="ftlab.eval")
    assert last.returncode == 0
    assert json.loads((run / "last_eval.json").read_text())["val_loss"] > scored["val_loss"]


def test_when_the_last_validation_is_best_no_second_adapter_is_written(tmp_path):
    proc = run_cli(*TINY, "trainer.max_steps=4", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = metrics(tmp_path / "run")
    history = [h["val_loss"] for h in m["val_history"] if h["step"] > 0]
    # The premise (seeded, so the same on every run): LoRA at its own small rate (1e-3) lowers
    # the validation loss at every check of these 4 steps, so the last validation is the best.
    assert history == sorted(history, reverse=True) and len(history) == 2, history
    assert m["best"]["step"] == m["steps"] == 4
    assert m["best"]["value"] == pytest.approx(history[-1], rel=1e-6)
    assert m["best"]["adapter"] == "adapter" and not (tmp_path / "run" / "best_adapter").exists()


def test_classification_monitors_accuracy_and_maximises_it(tmp_path):
    proc = run_cli(*TINY, "model=tiny-bert", "data=classification", "trainer.max_steps=6",
                   "monitor.metric=val/accuracy", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = metrics(tmp_path / "run")
    assert m["best"]["mode"] == "max"
    history = [h["val_accuracy"] for h in m["val_history"] if h["step"] > 0]
    assert m["best"]["value"] == pytest.approx(max(history))


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,needles", [
    (["monitor.metric=val/accuracy"], ["monitor.metric=val/accuracy is never logged", "data.format=instruction",
                                      "val/perplexity"]),
    (["monitor.metric=val/los"], ["monitor.metric='val/los' is not a metric ftlab logs", "did you mean"]),
    (["monitor.patience=2", "trainer.val_check_interval=10"],
     ["trainer.val_check_interval=10 is more than trainer.max_steps=3", "never logged"]),
    (["monitor.patience=2", "trainer.limit_val_batches=0"], ["limit_val_batches=0"]),
    (["monitor.patience=0"], ["monitor.patience"]),
    (["monitor.mode=up"], ["monitor.mode"]),
    (["scheduler.warmup_steps=3"], ["scheduler.warmup_steps=3 warms up for 3 optimizer steps",
                                    "the run takes 3"]),
    (["scheduler.warmup_ratio=1.0"], ["scheduler.warmup_ratio"]),
], ids=["metric-not-logged", "metric-typo", "no-validation-in-time", "validation-off", "patience-0",
        "mode", "warmup-steps", "warmup-ratio"])
def test_bad_monitor_or_schedule_is_refused_before_training(args, needles, tmp_path):
    proc = run_cli(*TINY, *args, f"hydra.run.dir={tmp_path}/run")
    assert_usage_error(proc, *needles)
    assert not (tmp_path / "run" / "metrics.json").exists()  # nothing trained


def test_warmup_longer_than_an_epoch_sized_run_is_refused(tmp_path):
    """Sized in epochs, the step count is known once the data is: still refused before training."""
    proc = run_cli(*TINY, "trainer.max_steps=-1", "trainer.max_epochs=1", "scheduler.warmup_steps=500",
                   f"hydra.run.dir={tmp_path}/run")
    assert_usage_error(proc, "scheduler.warmup_steps=500", "optimizer steps")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_eval_best_without_a_best_model_is_refused(tmp_path):
    proc = run_cli(*TINY, "monitor.keep_best=false", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert metrics(tmp_path / "run")["best"] is None
    assert_usage_error(run_cli(str(tmp_path / "run"), "--best", module="ftlab.eval"), "no best model")


# ---------------------------------------------------------------------------- clipping, accumulation
def _lora_b_norm(run) -> float:
    """Norm of all LoRA B matrices of the saved adapter (B starts at zero)."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    return float(torch.sqrt(sum((v.double() ** 2).sum() for k, v in tensors.items() if "lora_B" in k)))


def test_gradient_clipping_bounds_the_first_update(tmp_path):
    """One SGD step of size lr: LoRA's A gets no gradient while B = 0, so the step moves B by
    lr * g_B; with trainer.gradient_clip_val=c the global gradient norm is at most c, so
    ||B|| <= lr * c after it, while unclipped it is far larger."""
    common = [*TINY, "optimizer=sgd", "optimizer.lr=1.0", "optimizer.momentum=0.0", "trainer.max_steps=1",
              "trainer.val_check_interval=1", "scheduler.name=constant", "eval.generate=false"]
    clipped, free = tmp_path / "clipped", tmp_path / "free"
    for run, extra in ((clipped, ["trainer.gradient_clip_val=0.001"]), (free, [])):
        proc = run_cli(*common, *extra, f"hydra.run.dir={run}")
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert 0 < _lora_b_norm(clipped) <= 0.001 * (1 + 1e-4)
    assert _lora_b_norm(free) > 100 * _lora_b_norm(clipped)


def test_accumulation_sizes_an_epoch_and_the_schedule_ends_at_its_last_step(tmp_path):
    """max_epochs=1 over 356 training rows in batches of 32: 12 micro-batches, 6 optimizer steps
    with accumulate_grad_batches=2; the linear schedule reaches min_lr_ratio (0) at step 6."""
    import csv

    run = tmp_path / "run"
    proc = run_cli(*[a for a in TINY if not a.startswith(("trainer.max_steps", "data.batch_size", "logger"))],
                   "trainer.max_steps=-1", "trainer.max_epochs=1", "data.batch_size=32",
                   "trainer.accumulate_grad_batches=2", "trainer.log_every_n_steps=1", "logger=csv",
                   "eval.generate=false", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = metrics(run)
    assert m["train_examples"] == 356 and m["steps"] == 6
    with open(run / "logs" / "metrics.csv") as fh:
        lrs = [float(r["train/lr"]) for r in csv.DictReader(fh) if r.get("train/lr")]
    # Step t (0-based) trains at 1e-3 * (6 - t) / 6: six distinct values, the last 1e-3 / 6.
    assert sorted(lrs, reverse=True) == lrs and len(lrs) == 6
    assert lrs == pytest.approx([1e-3 * (6 - t) / 6 for t in range(6)], rel=1e-6)
