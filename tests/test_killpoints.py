"""SIGKILL at any moment loses at most the work since the last checkpoint.

A tiny run is killed at chosen writes (tests/killpoints.py: the k-th write under its run
directory, before it happens), then ``resume=last`` finishes it. At every kill point: each
checkpoint left loads, an adapter left loads, ``metrics.json`` is absent or whole JSON; after
the resume the run is completed, its losses and adapter equal those of a run never killed, and
no temporary file of the interrupted writes is left.

The default run kills at a few representative points (in a step checkpoint's write, in the
final adapter save, before the final metrics.json); ``-m stress`` kills at every write.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ftlab import cli
from ftlab.io import _ORPHAN
from ftlab.training.checkpoints import checkpoints, read_checkpoint
from killpoints import run_forked
from tiny_runs import one_thread, train_run

# 6 steps, a checkpoint every 2, a validation (and best.ckpt) every 3.
ARGS = ["trainer.max_steps=6", "checkpoint.every_n_steps=2", "trainer.val_check_interval=3",
        "data.batch_size=4", "eval.generate=false", "optimizer.lr=1e-2", "eval.max_examples=2"]
STEPS = 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run never killed, and the list of its writes (the kill points)."""
    base = tmp_path_factory.mktemp("reference")
    run_dir, events = base / "run", base / "events.json"
    assert run_forked(run_dir, lambda: train_run(run_dir, *ARGS), events_file=events) == 0
    return run_dir, [tuple(e) for e in json.loads(events.read_text())]


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def _losses(run_dir: Path) -> dict[int, float]:
    return dict(map(tuple, json.loads((run_dir / "metrics.json").read_text())["train_loss_history"]))


def check_whole(run_dir: Path) -> dict:
    """Whatever the killed run left is usable: checkpoints and adapters load, metrics.json
    is whole. Returns metrics.json ({} when absent)."""
    from ftlab.rundir import RunDir, load_run

    for path in checkpoints(run_dir):
        read_checkpoint(path)  # raises on a truncated file
    if (run_dir / "adapter").exists():
        load_run(run_dir)  # the adapter onto the rebuilt base model
    if (run_dir / "best_adapter").exists():
        run = RunDir.open(run_dir)
        from ftlab.models import load_model

        model, _ = load_model(run.settings.model, seed=run.settings.seed)
        run.method().load(model, run_dir / "best_adapter")
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.exists():
        return {}
    metrics = json.loads(metrics_file.read_text())
    assert isinstance(metrics, dict) and metrics["status"] in ("running", "completed"), metrics
    return metrics


def kill_and_resume(reference, base: Path, kill_at: int, capsys) -> str:
    """Kill a fresh run at write ``kill_at``, check it, resume it, check the result. Returns
    what happened: 'resumed', 'completed' (killed after its last write that matters) or
    'restart' (killed before its first checkpoint: nothing to resume)."""
    ref_dir, events = reference
    run_dir = base / f"kill-{kill_at}"
    status = run_forked(run_dir, lambda: train_run(run_dir, *ARGS), kill_at=kill_at)
    assert status == -9, (kill_at, events[kill_at], status)
    metrics = check_whole(run_dir) if run_dir.exists() else {}
    if metrics.get("status") != "completed":
        if not checkpoints(run_dir):
            capsys.readouterr()
            with pytest.raises(SystemExit) as exc:
                cli.main(["resume=last", f"hydra.run.dir={run_dir}"])
            err = capsys.readouterr().err
            assert exc.value.code == 2 and any(reason in err for reason in (
                "no checkpoint to resume from", "no such run directory", "is not an ftlab run directory")), err
            return "restart"
        cli.main(["resume=last", f"hydra.run.dir={run_dir}"])
        outcome = "resumed"
    else:
        outcome = "completed"
    metrics = check_whole(run_dir)
    assert metrics["status"] == "completed" and metrics["steps"] == STEPS
    ref, got = _losses(ref_dir), _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert abs(got[step] - ref[step]) <= 1e-6, (kill_at, events[kill_at], step, got[step], ref[step])
    ref_adapter, adapter = _adapter(ref_dir / "adapter"), _adapter(run_dir / "adapter")
    assert ref_adapter.keys() == adapter.keys()
    for name, tensor in adapter.items():
        assert torch.allclose(tensor, ref_adapter[name], atol=1e-6), (kill_at, name)
    leftovers = [p for p in run_dir.rglob(".*") if _ORPHAN.match(p.name)]
    assert not leftovers, (kill_at, events[kill_at], leftovers)
    return outcome


def _first(events, event: str, pattern: str, last: bool = False) -> int:
    found = [i for i, (e, path) in enumerate(events) if e == event and re.fullmatch(pattern, path)]
    assert found, (event, pattern, events)
    return found[-1] if last else found[0]


# (name, event, path pattern, last match): representative moments of a run.
REPRESENTATIVE = [
    ("during a step checkpoint's write", "open", r"checkpoints/\.step-4\.ckpt\.tmp-\w+", False),
    ("during the final adapter save", "os.rename", r"\.adapter-tmp-\w+", False),
    ("before the final metrics.json", "os.rename", r"\.metrics\.json\.tmp-\w+", True),
]


@pytest.mark.parametrize("name,event,pattern,last", REPRESENTATIVE, ids=[r[0] for r in REPRESENTATIVE])
def test_sigkill_at_a_write_then_resume_completes_exactly(reference, tmp_path, capsys, name, event,
                                                          pattern, last):
    kill_at = _first(reference[1], event, pattern, last)
    outcome = kill_and_resume(reference, tmp_path, kill_at, capsys)
    assert outcome == "resumed"


@pytest.mark.stress
def test_sigkill_at_every_write_then_resume_completes(reference, tmp_path, capsys):
    """Every write of the run is a kill point (docs/robustness.md has the figures)."""
    events = reference[1]
    outcomes = {}
    for k in range(len(events)):
        outcomes[k] = kill_and_resume(reference, tmp_path, k, capsys)
    summary = {o: sum(1 for v in outcomes.values() if v == o) for o in set(outcomes.values())}
    print(f"\nkill points: {len(events)}; outcomes: {summary}")
    # Once the first checkpoint is in place every kill point is resumable.
    first_ckpt = _first(events, "os.rename", r"checkpoints/\.step-2\.ckpt\.tmp-\w+")
    assert all(outcomes[k] != "restart" for k in range(first_ckpt + 1, len(events)))
