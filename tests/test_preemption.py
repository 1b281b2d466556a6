"""SLURM preemption, simulated on the CPU: the SLURM environment variables of a batch job, a
fake ``scontrol`` on PATH that records its arguments, and the signal SLURM sends before the
time limit (SIGUSR1 with ``--signal=USR1@120``) or when it preempts (SIGTERM).

The run saves at the end of the step, requeues the job and exits; the same command started
again (what a requeued job does) continues the run from its checkpoint by itself."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from ftlab import cli
from ftlab.training import preemption
from ftlab.training.checkpoints import read_checkpoint
from killpoints import fork, wait
from tiny_runs import FAST, one_thread, wait_for

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
         "SLURM_NODEID": "0", "SLURM_JOB_NAME": "train.sbatch"}
LONG = [*FAST, "trainer.max_steps=40", "data.batch_size=4", "checkpoint.every_n_steps=2",
        "trainer.val_check_interval=20", "eval.generate=false", "eval.max_examples=2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture
def slurm(tmp_path, monkeypatch) -> Path:
    """A SLURM batch job's environment and a fake scontrol; returns the file of its calls."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol-calls.txt"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit "${{FAKE_SCONTROL_STATUS:-0}}"\n')
    scontrol.chmod(0o755)
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    return calls


def _signal_mid_training(run_dir: Path, argv: list[str], signum: int) -> int:
    pid = fork(lambda: cli.main(argv))
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "step-2.ckpt").exists(), 300, "the first checkpoint")
        os.kill(pid, signum)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    return wait(pid)


def test_sigusr1_under_slurm_saves_requeues_and_the_requeued_job_continues(tmp_path, slurm, capfd):
    run_dir = tmp_path / "run"
    argv = [*LONG, f"hydra.run.dir={run_dir}"]
    status = _signal_mid_training(run_dir, argv, signal.SIGUSR1)
    err = capfd.readouterr().err
    assert status == 128 + signal.SIGUSR1, err[-3000:]
    assert slurm.read_text().split("\n")[0] == "requeue 4242"
    assert "interrupted by SIGUSR1 at step" in err and "requeued SLURM job 4242" in err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stopped = metrics["interrupted_at_step"]
    assert metrics["status"] == "interrupted" and metrics["signal"] == "SIGUSR1" and "requeue" in metrics
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == stopped < 40
    assert json.loads((run_dir / "slurm.json").read_text()) == {"job_id": "4242", "argv": argv}

    # The requeued job: the same command, the same job id, no resume= anywhere.
    cli.main(list(argv))
    out = capfd.readouterr().out
    assert f"SLURM job started again: continuing {run_dir}" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["resumed_at_step"] == stopped
    assert [s for s, _ in metrics["train_loss_history"]] == list(range(1, 41))
    assert slurm.read_text().count("requeue") == 1


def test_sigterm_under_slurm_also_requeues(tmp_path, slurm, capfd):
    run_dir = tmp_path / "run"
    status = _signal_mid_training(run_dir, [*LONG, f"hydra.run.dir={run_dir}"], signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, capfd.readouterr().err[-3000:]
    assert slurm.read_text() == "requeue 4242\n"
    assert json.loads((run_dir / "metrics.json").read_text())["signal"] == "SIGTERM"


def test_requeue_only_under_a_slurm_batch_job(slurm, monkeypatch):
    assert preemption.requeue(signal.SIGINT) is None  # Ctrl-C is no preemption
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    assert preemption.requeue(signal.SIGUSR1) is None
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert preemption.requeue(signal.SIGUSR1) == ("requeued SLURM job 77_3; it continues this run when it "
                                                  "starts again")
    monkeypatch.setenv("FAKE_SCONTROL_STATUS", "1")
    assert "failed with status 1" in preemption.requeue(signal.SIGTERM)
    assert slurm.read_text() == "requeue 77_3\nrequeue 77_3\n"
    for key in SLURM:
        monkeypatch.delenv(key)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    assert preemption.requeue(signal.SIGUSR1) is None and preemption.slurm_job_id() is None


def test_requeued_run_is_found_by_job_id_and_command(tmp_path, slurm, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["model=tiny-llama", "trainer.max_steps=5"]
    runs = {name: tmp_path / "outputs" / "2026-12-01" / name for name in ("mine", "other-job", "other-cmd", "done")}
    recorded = {"mine": ("4242", argv), "other-job": ("4243", argv),
                "other-cmd": ("4242", argv + ["seed=1"]), "done": ("4242", argv)}
    for name, run_dir in runs.items():
        run_dir.mkdir(parents=True)
        job, command = recorded[name]
        (run_dir / "slurm.json").write_text(json.dumps({"job_id": job, "argv": command}))
        time.sleep(0.01)
    (runs["done"] / "metrics.json").write_text(json.dumps({"status": "completed"}))
    assert preemption.requeued_run(argv, None) == Path("outputs/2026-12-01/mine")
    assert preemption.requeued_run(argv, runs["other-cmd"]) is None
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    assert preemption.requeued_run(argv, None) is None


def test_a_requeued_job_without_a_checkpoint_starts_again_in_its_directory(tmp_path, slurm):
    """Killed before its first checkpoint: the same command starts the run again where it was
    (an explicit hydra.run.dir that is not empty is otherwise refused)."""
    run_dir = tmp_path / "run"
    argv = ["model=tiny-llama", "method=lora", "dry_run.enabled=true", f"hydra.run.dir={run_dir}"]
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: 42\n")
    (run_dir / "slurm.json").write_text(json.dumps({"job_id": "4242", "argv": argv}))
    cli.main(list(argv))
    assert (run_dir / "plan.json").is_file()
