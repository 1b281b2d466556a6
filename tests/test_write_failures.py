"""A write that fails (disk full, read-only or unwritable output) ends the command with one
line naming the path: exit status 2 before training, 74 (EX_IOERR) once training has started,
and the checkpoint and adapter written before stay whole, so ``resume=`` continues the run.

The failures are injected where the kernel would report them: a Python audit hook makes the
matching write raise ``OSError`` (tests/killpoints.py), or ``torch.save`` fails half-way
through a checkpoint after writing some bytes. The command runs in a forked child of the test
process (``cli.main``, as ``python -m ftlab`` runs it), so its exit status is observed.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from ftlab import cli
from ftlab.io import _ORPHAN, WriteError, atomic_directory, write_json
from ftlab.training.checkpoints import checkpoints, read_checkpoint
from killpoints import ENOSPC, EROFS, run_forked
from tiny_runs import FAST, one_thread

ARGS = [*FAST, "trainer.max_steps=6", "checkpoint.every_n_steps=2", "trainer.val_check_interval=3",
        "data.batch_size=4", "eval.generate=false", "eval.max_examples=2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err[-3000:]
    return [line for line in err.splitlines() if line.startswith("ftlab: error:")]


def leftovers(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob(".*") if _ORPHAN.match(p.name)]


def test_write_error_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    write_json(target, {"status": "running"})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("ftlab.io.os.fsync", full)
    with pytest.raises(WriteError) as exc:
        write_json(target, {"status": "completed"})
    assert str(target) in str(exc.value) and "no space left" in str(exc.value)
    assert json.loads(target.read_text()) == {"status": "running"}
    assert not leftovers(tmp_path)

    def fill(directory: Path) -> None:  # a library writing the adapter's files runs out of space
        (directory / "config.json").write_text("{}")
        full()

    with pytest.raises(WriteError, match="adapter"):
        atomic_directory(tmp_path / "adapter", fill)
    assert not (tmp_path / "adapter").exists() and not leftovers(tmp_path)


def test_unwritable_output_directory_is_refused_before_training(tmp_path, capfd):
    run_dir = tmp_path / "out" / "run"
    status = run_forked(tmp_path, lambda: cli.main([*ARGS, f"hydra.run.dir={run_dir}"]), fail=("out", EROFS))
    lines = error_lines(capfd.readouterr().err)
    assert status == 2 and len(lines) == 1, lines
    assert f"cannot write {tmp_path / 'out' / 'run'}" in lines[0] or f"cannot write {tmp_path / 'out'}" in lines[0]
    assert "read-only" in lines[0]
    assert not run_dir.exists()


def _save_failing_at_step(step: int):
    """``torch.save`` that writes part of the checkpoint of ``step``, then finds the disk full."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step") == step and "optimizer_states" in obj:
            f.write(b"\x80" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)
    return save


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_resume_continues(tmp_path, capfd,
                                                                                   monkeypatch):
    run_dir = tmp_path / "run"

    def body():
        monkeypatch.setattr(torch, "save", _save_failing_at_step(4))
        cli.main([*ARGS, f"hydra.run.dir={run_dir}"])

    status = run_forked(tmp_path, body)
    lines = error_lines(capfd.readouterr().err)
    assert status == 74 and len(lines) == 1, (status, lines)
    assert f"cannot write {run_dir / 'checkpoints' / 'step-4.ckpt'}" in lines[0]
    assert "no space left on the device (ENOSPC)" in lines[0] and f"resume={run_dir}" in lines[0]
    assert [p.name for p in checkpoints(run_dir)] == ["best.ckpt", "step-2.ckpt"]
    assert read_checkpoint(run_dir / "checkpoints" / "step-2.ckpt")["global_step"] == 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "ENOSPC" in metrics["error"]
    assert not leftovers(run_dir) and not (run_dir / "adapter").exists()

    cli.main([f"resume={run_dir}"])  # space is back
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 6


def test_disk_full_during_the_adapter_save_keeps_the_last_checkpoint(tmp_path, capfd):
    run_dir = tmp_path / "run"
    status = run_forked(tmp_path, lambda: cli.main([*ARGS, f"hydra.run.dir={run_dir}"]),
                        fail=("run/.adapter-tmp-*/adapter_config.json", ENOSPC))
    lines = error_lines(capfd.readouterr().err)
    assert status == 74 and len(lines) == 1, (status, lines)
    assert f"cannot write {run_dir / 'adapter'}" in lines[0] and "ENOSPC" in lines[0]
    assert "last.ckpt" in lines[0]
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert not (run_dir / "adapter").exists() and not leftovers(run_dir)
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"

    cli.main([f"resume={run_dir}"])
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
