"""Lightning Trainer settings a user may pass under ``trainer.``: each one either works end to
end or is refused with one line and exit status 2 before any weight loads."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, assert_usage_error, run_cli


def metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


def validation_off(run, proc) -> None:
    m = metrics(run)
    assert m["status"] == "completed" and m["steps"] == 3 and m["validation"] == "off"
    assert not [k for k in m if k.startswith("val_") and k not in ("val_examples", "val_history")], m
    assert m["val_history"] == [] and m["best"] is None
    assert "Evaluating before training" not in proc.stdout
    assert "Validation: off (trainer.limit_val_batches=0)" in proc.stdout
    assert not (run / "checkpoints" / "best.ckpt").exists()


def validated_before_and_after(run, proc) -> None:
    m = metrics(run)
    assert m["status"] == "completed" and m["steps"] == 3 and m["validation"] == "on"
    assert "val_loss" in m and "val_loss_initial" in m


def one_step(run, proc) -> None:
    m = metrics(run)
    assert m["status"] == "completed" and m["steps"] == 1 and "val_loss" in m


WORKS = {
    "limit_val_batches=0": (["trainer.limit_val_batches=0"], validation_off),
    "limit_val_batches=0.0": (["trainer.limit_val_batches=0.0"], validation_off),
    "val_check_interval>run": (["trainer.val_check_interval=100"], validated_before_and_after),
    "overfit_batches": (["+trainer.overfit_batches=2"], validated_before_and_after),
    "fast_dev_run": (["+trainer.fast_dev_run=true"], one_step),
    "num_sanity_val_steps": (["+trainer.num_sanity_val_steps=2"], validated_before_and_after),
}


@pytest.mark.parametrize("args,check", WORKS.values(), ids=WORKS.keys())
def test_trainer_setting_works(args, check, tmp_path):
    run = tmp_path / "run"
    proc = run_cli(*TINY, *args, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check(run, proc)


REFUSED = {
    "limit_train_batches=0": (["+trainer.limit_train_batches=0"], ["trains nothing"]),
    "max_steps=0": (["trainer.max_steps=0"], ["trainer.max_steps must be a positive integer"]),
    "max_epochs=0": (["trainer.max_steps=-1", "trainer.max_epochs=0"],
                     ["trainer.max_epochs must be a positive integer or -1", "train nothing"]),
    "max_epochs=0 with max_steps": (["trainer.max_epochs=0"], ["trainer.max_epochs"]),
    "accelerator": (["+trainer.accelerator=cpu"], ["trainer.accelerator is set by ftlab",
                                                    "hardware.accelerator"]),
    "devices": (["+trainer.devices=2"], ["hardware.devices"]),
    "early stopping, validation off": (["trainer.limit_val_batches=0", "monitor.patience=2"],
                                       ["needs validation", "limit_val_batches=0"]),
    "limit_val_batches>1.0": (["trainer.limit_val_batches=1.5"], ["trainer.limit_val_batches", "1.5"]),
    "limit_val_batches<0": (["trainer.limit_val_batches=-1"], ["trainer.limit_val_batches"]),
    "val_check_interval=0": (["trainer.val_check_interval=0"], ["limit_val_batches=0"]),
    "val_check_interval>1.0": (["trainer.val_check_interval=2.5"], ["trainer.val_check_interval"]),
    "fast_dev_run<0": (["+trainer.fast_dev_run=-1"], ["trainer.fast_dev_run"]),
    "num_sanity_val_steps<-1": (["+trainer.num_sanity_val_steps=-2"], ["num_sanity_val_steps"]),
    "not a Trainer argument": (["+trainer.max_step=3"], ["not a lightning.Trainer argument"]),
}


@pytest.mark.parametrize("args,needles", REFUSED.values(), ids=REFUSED.keys())
def test_trainer_setting_refused_before_weights_load(args, needles, tmp_path):
    proc = run_cli(*TINY, *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert_usage_error(proc, *needles)
    assert "ftlab: model " not in proc.stdout  # printed just before the weights load
