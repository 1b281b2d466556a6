"""Faults: a real ``python -m ftlab`` process gets SIGTERM, SIGINT or SIGKILL mid-run; a loss
turns NaN. What must hold afterwards: a loadable checkpoint, an honest metrics.json, and a
resumed run whose losses equal those of a run that was never stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from ftlab import cli
from ftlab.training.faults import NonFiniteLoss
from ftlab.training.checkpoints import checkpoints, latest_checkpoint, read_checkpoint
from tiny_runs import ENV, FAST, REPO, cached_run, one_thread, start_cli, train_run, wait_for


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


# 40 short steps, a checkpoint every 2: the first one tells the test that training is under
# way, and the run is still far from its end when the signal lands.
LONG = ["trainer.max_steps=40", "data.batch_size=4", "checkpoint.every_n_steps=2",
        "trainer.val_check_interval=10", "eval.generate=false", "optimizer.lr=1e-2"]
STEPS = 40
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT, "SIGKILL": signal.SIGKILL}


def losses(run_dir: Path) -> dict[int, float]:
    return dict(map(tuple, json.loads((run_dir / "metrics.json").read_text())["train_loss_history"]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three real runs, each sent one signal once its first checkpoint exists, and the same
    run never interrupted (trained here meanwhile: the processes overlap on the cores)."""
    started = {}
    for name, signum in SIGNALS.items():
        base = tmp_path_factory.mktemp(name)
        run_dir, log = base / "run", base / "run.log"
        # SIGKILL: a checkpoint at every step, so the kill lands among frequent writes
        extra = ["checkpoint.every_n_steps=1"] if signum == signal.SIGKILL else []
        started[name] = (start_cli(*FAST, *LONG, *extra, f"hydra.run.dir={run_dir}", log=log), run_dir, log)
    failures = []

    def send(name: str) -> None:
        proc, run_dir, log = started[name]
        try:
            wait_for(lambda: (run_dir / "checkpoints" / "step-2.ckpt").exists(), 300,
                     f"the first checkpoint of the {name} run", proc, log)
            proc.send_signal(SIGNALS[name])
        except AssertionError as err:
            failures.append(str(err))

    senders = [threading.Thread(target=send, args=(name,)) for name in SIGNALS]
    for t in senders:
        t.start()
    try:
        reference = cached_run(tmp_path_factory, *LONG, "checkpoint.every_n_steps=1000")
        for t in senders:
            t.join()
        for proc, _, _ in started.values():
            proc.wait(timeout=300)
    finally:
        for proc, _, _ in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not failures, failures[0]
    return reference, started


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_resume_continues_exactly(name, runs):
    reference, started = runs
    proc, run_dir, log = started[name]
    signum = SIGNALS[name]
    out = log.read_text()
    assert proc.returncode == 128 + signum, out[-3000:]
    assert f"interrupted by {name} at step" in out and f"resume={run_dir}" in out
    assert "Traceback" not in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["signal"] == name
    stopped = metrics["interrupted_at_step"]
    assert 2 <= stopped < STEPS
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == stopped
    assert sorted(losses(run_dir)) == list(range(1, stopped + 1))

    # both spellings: the run directory, or `last` within the named run
    cli.main([f"resume={run_dir}"] if name == "SIGTERM" else ["resume=last", f"hydra.run.dir={run_dir}"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["resumed_at_step"] == stopped
    ref, got = losses(reference), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])


def test_sigkill_keeps_a_loadable_checkpoint_and_resume_continues(runs):
    reference, started = runs
    proc, run_dir, log = started["SIGKILL"]
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "running"
    _, ckpt = latest_checkpoint(run_dir)  # every checkpoint file there loads
    step = int(ckpt["global_step"])
    assert 2 <= step < STEPS
    cli.main([f"resume={run_dir}"])
    ref, got = losses(reference), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert abs(got[s] - ref[s]) <= 1e-6, (s, got[s], ref[s])


KILLED_WHILE_WRITING = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from ftlab.training.checkpoints import AtomicCheckpointIO

    class Slow:  # pickled in the middle of the checkpoint: the write is under way
        def __reduce__(self):
            Path(sys.argv[2]).write_text("writing")
            time.sleep(120)
            return (int, (0,))

    AtomicCheckpointIO().save_checkpoint(
        {"global_step": 9, "state_dict": {"w": torch.ones(1000)}, "slow": Slow()}, sys.argv[1])
""")


def test_sigkill_while_writing_a_checkpoint_leaves_the_old_one_whole(tmp_path):
    path, marker = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "writing"
    old = {"global_step": 4, "state_dict": {"w": torch.arange(10.0)}}
    from ftlab.training.checkpoints import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint(old, path)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_WRITING, str(path), str(marker)], env=ENV,
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(marker.exists, 120, "the checkpoint write to start", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in path.parent.iterdir() if p.name != "last.ckpt"]
    assert leftovers and all(n.startswith(".last.ckpt.tmp-") for n in leftovers)  # the unfinished write
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 4 and torch.equal(loaded["state_dict"]["w"], old["state_dict"]["w"])
    assert checkpoints(tmp_path) == [path]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    # Adam's first step moves every weight by about lr: at 1e36 the next forward overflows.
    with pytest.raises(NonFiniteLoss) as exc:
        train_run(run_dir, "method=full", "trainer.max_steps=5", "checkpoint.every_n_steps=1",
                  "optimizer.lr=1e36", "eval.generate=false")
    assert "at step 2" in str(exc.value) and "optimizer.lr" in str(exc.value)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["failed_at_step"] == 2
    assert "at step 2" in metrics["error"]
    assert [p.name for p in checkpoints(run_dir)] == ["step-1.ckpt"]
    assert Path(metrics["last_checkpoint"]).name == "step-1.ckpt"
    ckpt = read_checkpoint(run_dir / "checkpoints" / "step-1.ckpt")
    assert ckpt["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert not (run_dir / "model").exists()
