"""Inside real runs (the pipeline of ``python -m ftlab``, trained in this process on the tiny
Llama): the cosine schedule with ``scheduler.warmup_ratio`` step by step, as the csv logger
records it, and early stopping with ``monitor.min_delta``."""

from __future__ import annotations

import csv
import json
import math

import pytest

from tiny_runs import one_thread, train_run


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def _logged_lrs(run) -> list[tuple[int, float]]:
    with open(run / "logs" / "metrics.csv") as fh:
        return [(int(r["step"]), float(r["train/lr"])) for r in csv.DictReader(fh) if r.get("train/lr")]


def test_cosine_schedule_with_warmup_ratio_step_by_step(tmp_path):
    """lr 1e-3, 10 steps, warmup_ratio 0.25, floor 0.1. Expected, written out from the rule
    docs/training.md states (linear warmup over warmup_ratio of the run, rounded up, then
    cosine decay to min_lr_ratio x lr at the end of the run) with ftlab's warmup convention
    (ftlab/training/optim.py: step t of a warmup of W steps trains at (t+1)/(W+1) of the rate,
    so no step is wasted at 0):
        W = ceil(0.25 * 10) = 3
        t < 3:  1e-3 * (t + 1) / 4                       -> 2.5e-4, 5e-4, 7.5e-4
        t >= 3: 1e-3 * (0.1 + 0.9 * (1 + cos(pi * (t - 3) / 7)) / 2)
    """
    run = tmp_path / "run"
    train_run(run, "logger=csv", "trainer.log_every_n_steps=1", "trainer.max_steps=10",
              "trainer.val_check_interval=10", "eval.before=false", "eval.generate=false",
              "optimizer.lr=1e-3", "scheduler.name=cosine", "scheduler.warmup_ratio=0.25",
              "scheduler.min_lr_ratio=0.1")
    logged = _logged_lrs(run)
    assert [step for step, _ in logged] == list(range(10))  # one row per optimizer step
    lrs = [lr for _, lr in logged]
    warmup = [1e-3 * (t + 1) / 4 for t in range(3)]
    cosine = [1e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi * (t - 3) / 7)) / 2) for t in range(3, 10)]
    assert lrs == pytest.approx(warmup + cosine, rel=1e-6)
    assert lrs[3] == pytest.approx(1e-3) and max(lrs) == lrs[3]  # the peak right after the warmup
    assert json.loads((run / "metrics.json").read_text())["steps"] == 10


# ---------------------------------------------------------------------------- min_delta
STOPPING = ["trainer.max_steps=8", "trainer.val_check_interval=1", "eval.before=false",
            "eval.generate=false", "optimizer.lr=2e-2", "data.batch_size=16", "monitor.patience=1",
            "checkpoint.every_n_steps=100"]


def _stop_step(losses: list[tuple[int, float]], min_delta: float, patience: int) -> int | None:
    """The step at which early stopping (docs/training.md: stop after `patience` validations in
    a row without an improvement of more than min_delta) stops, given the validation losses."""
    best, waited = math.inf, 0
    for step, loss in losses:
        if loss < best - min_delta:
            best, waited = loss, 0
        else:
            waited += 1
            if waited >= patience:
                return step
    return None


def _val_losses(run) -> list[tuple[int, float]]:
    """(step, val_loss) of each validation during training (not the evaluation before it; the
    one after it, at the last step, is that step's validation again)."""
    history = json.loads((run / "metrics.json").read_text())["val_history"]
    first = {}
    for v in history:
        if v["step"] > 0:
            first.setdefault(v["step"], v["val_loss"])
    return sorted(first.items())


def test_min_delta_decides_whether_a_run_stops_early(tmp_path):
    """The same run (same seed, so the same losses up to any stop) with min_delta 0, where
    every validation improves, and with a min_delta above some of its improvements: the second
    stops exactly where the rule, applied to the first run's validation losses, says."""
    free = tmp_path / "free"
    train_run(free, *STOPPING, "monitor.min_delta=0.0")
    losses = _val_losses(free)
    m = json.loads((free / "metrics.json").read_text())
    assert [s for s, _ in losses] == list(range(1, 9))
    assert _stop_step(losses, 0.0, 1) is None  # the premise: each validation beats the last
    assert m["steps"] == 8 and m["best"]["stopped_early"] is False

    gains = sorted(a - b for (_, a), (_, b) in zip(losses, losses[1:]))
    min_delta = (gains[len(gains) // 2 - 1] + gains[len(gains) // 2]) / 2  # between two gains
    expected = _stop_step(losses, min_delta, 1)
    assert expected is not None and expected < 8

    stopped = tmp_path / "stopped"
    train_run(stopped, *STOPPING, f"monitor.min_delta={min_delta}")
    s = json.loads((stopped / "metrics.json").read_text())
    assert s["best"]["stopped_early"] is True
    assert s["best"]["last_step"] == s["steps"] == expected
    kept = _val_losses(stopped)
    assert [step for step, _ in kept] == list(range(1, expected + 1))
    assert [loss for _, loss in kept] == pytest.approx([loss for _, loss in losses[:expected]], abs=1e-6)
