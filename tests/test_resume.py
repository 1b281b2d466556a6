"""Resume: a run continued from a checkpoint trains exactly as if it had never stopped.

The uninterrupted reference writes a periodic checkpoint at step k; a copy of the run that
lost everything after that checkpoint (as after a crash) is resumed, and its losses and final
adapter are compared with the reference's, step for step.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from ftlab import cli
from ftlab.training.checkpoints import latest_checkpoint
from ftlab.training.loaders import ResumableLoader, SeededSampler, resumable_loader
from tiny_runs import DELTA_LORA, FAST, NATIVE_VERA, cached_run, one_thread, tree_digest


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


# 6 batches of 64 per epoch (356 training examples): the 7 steps cross an epoch boundary,
# the checkpoint at step 4 is mid-epoch, and LoRA dropout makes the random state matter.
EXACT = ["data.batch_size=64", "trainer.max_steps=7", "checkpoint.every_n_steps=4",
         "trainer.val_check_interval=3", "eval.generate=false", "optimizer.lr=1e-2"]


def crashed_copy(run_dir: Path, dest: Path, keep: str) -> Path:
    """``run_dir`` as it was when only checkpoint ``keep`` existed and the process died."""
    shutil.copytree(run_dir, dest)
    for ckpt in (dest / "checkpoints").glob("*.ckpt"):
        if ckpt.name != keep:
            ckpt.unlink()
    shutil.rmtree(dest / "adapter")
    metrics = json.loads((dest / "metrics.json").read_text())
    (dest / "metrics.json").write_text(json.dumps({**metrics, "status": "running"}))
    return dest


def resume(*args: str) -> None:
    cli.main([*args])


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def assert_same_training(reference: Path, resumed: Path, from_step: int, tol: float = 1e-6) -> None:
    ref, res = metrics(reference), metrics(resumed)
    assert res["status"] == "completed" and res["resumed_at_step"] == from_step
    ref_losses = dict(map(tuple, ref["train_loss_history"]))
    res_losses = dict(map(tuple, res["train_loss_history"]))
    assert sorted(res_losses) == sorted(ref_losses) == list(range(1, ref["steps"] + 1))
    after = [s for s in ref_losses if s > from_step]
    assert after, "nothing was trained after the checkpoint"
    for step in after:
        assert abs(res_losses[step] - ref_losses[step]) <= tol, (step, res_losses[step], ref_losses[step])
    a = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=tol, rtol=0)


def test_resume_continues_exactly_across_an_epoch_boundary(tmp_path_factory, tmp_path):
    reference = cached_run(tmp_path_factory, *EXACT)
    resumed = crashed_copy(reference, tmp_path / "run", keep="step-4.ckpt")
    resume(f"resume={resumed}")
    assert_same_training(reference, resumed, from_step=4, tol=0.0)  # bit for bit
    res = metrics(resumed)
    # the history of the first part came back with the checkpoint
    assert [p["step"] for p in res["val_history"]] == [3, 6, 7]
    assert "val_token_accuracy" in res


@pytest.mark.parametrize("method", [
    # AdaLoRA: the allocator's importance EMAs and rank pattern continue (masks at every step
    # until step 6; resuming without them gives other masks, and losses that differ at step 6).
    ["method=adalora", "method.init_r=8", "method.target_r=2", "method.tinit_fraction=0.0",
     "method.tfinal_fraction=0.15", "method.delta_t_fraction=0.1", "method.beta1=0.95",
     "method.beta2=0.95", "data.batch_size=16", "trainer.max_steps=7", "checkpoint.every_n_steps=4",
     "eval.generate=false", "optimizer.lr=2e-2"],
    # Delta-LoRA: W moves from step 3 on; the restart rebuilds it from the saved factors.
    DELTA_LORA,
], ids=["adalora", "delta_lora"])
def test_method_state_survives_a_restart(method, tmp_path_factory, tmp_path):
    reference = cached_run(tmp_path_factory, *method)
    ckpt = torch.load(reference / "checkpoints" / "step-4.ckpt", weights_only=True)
    assert ckpt["method_state"], "the method's own state is in the checkpoint"
    resumed = crashed_copy(reference, tmp_path / "run", keep="step-4.ckpt")
    resume(f"resume={resumed}")
    assert_same_training(reference, resumed, from_step=4, tol=1e-6)


def test_checkpoint_holds_only_trainable_parameters_and_state(tmp_path_factory):
    run = cached_run(tmp_path_factory, *EXACT)
    trainable = metrics(run)["trainable_params"]
    path = run / "checkpoints" / "step-4.ckpt"
    ckpt = torch.load(path, weights_only=True)
    weights = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert sum(v.numel() for v in weights.values()) == trainable
    assert all(".lora_" in k for k in weights)  # no frozen base weight
    moments = sum(v.numel() for s in ckpt["optimizer_states"][0]["state"].values()
                  for v in s.values() if torch.is_tensor(v) and v.ndim > 0)
    assert moments == 2 * trainable  # AdamW's two moments per trainable value
    # 4 bytes per value for weights and moments, plus bookkeeping (loop state, random
    # states, loss history): far below the 112,448-parameter frozen base (450 kB in fp32).
    assert path.stat().st_size < 3 * 4 * trainable + 48_000
    assert path.stat().st_size < 4 * metrics(run)["total_params"] / 4
    assert ckpt["ftlab"]["method"]["name"] == "lora" and "rng" in ckpt["ftlab"]


def _batches(loader):
    return [b.tolist() for b in loader]


@pytest.mark.parametrize("stop_after", [2, 3, 5])  # mid-epoch, last batch of epoch 0, epoch 1
def test_loader_state_resumes_at_the_next_batch(stop_after):
    data = list(range(10))
    base = DataLoader(data, batch_size=4, shuffle=True)  # 3 batches per epoch
    full = resumable_loader(base, seed=7)
    order = []
    for epoch in range(3):
        full.sampler.set_epoch(epoch)
        order += _batches(full)
    assert sorted(sum(order[:3], [])) == data and order[:3] != order[3:6]  # reshuffled per epoch

    first = resumable_loader(base, seed=7)
    seen, state = [], None
    for epoch in range(3):
        first.sampler.set_epoch(epoch)
        for batch in first:
            seen.append(batch.tolist())
            if len(seen) == stop_after:
                state = first.state_dict()
                break
        if state:
            break
    second = resumable_loader(base, seed=7)
    assert isinstance(second, ResumableLoader) and isinstance(second.sampler, SeededSampler)
    second.load_state_dict(state)
    epoch = state["epoch"] + (1 if state["batches"] == len(second) else 0)
    rest = []
    for e in range(epoch, 3):
        second.sampler.set_epoch(e)
        rest += _batches(second)
    assert seen + rest == order
    assert len(second) == 3  # Lightning counts the full epoch


# -- bad input: one message, status 2, the run directory untouched ------------------------------
def _refused(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(list(args))
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ftlab: error:")]
    assert len(errors) == 1
    return errors[0]


def test_bad_resume_requests_change_nothing(tmp_path_factory, tmp_path, capsys):
    done = cached_run(tmp_path_factory, *EXACT)
    other = cached_run(tmp_path_factory, *NATIVE_VERA)
    runs = {}

    runs["completed"] = done
    runs["no checkpoint"] = crashed_copy(done, tmp_path / "empty", keep="none")
    runs["foreign"] = crashed_copy(done, tmp_path / "foreign", keep="none")
    shutil.copy(other / "checkpoints" / "last.ckpt", runs["foreign"] / "checkpoints" / "last.ckpt")
    runs["truncated"] = crashed_copy(done, tmp_path / "truncated", keep="step-4.ckpt")
    ckpt = runs["truncated"] / "checkpoints" / "step-4.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    runs["not a run"] = tmp_path / "nothing"
    runs["not a run"].mkdir()
    before = {name: tree_digest(d) for name, d in runs.items()}

    assert "already completed" in _refused(capsys, f"resume={runs['completed']}")
    assert "no checkpoint" in _refused(capsys, f"resume={runs['no checkpoint']}")
    msg = _refused(capsys, f"resume={runs['foreign']}")
    assert "belongs to another method" in msg and "'vera'" in msg and "'lora'" in msg
    assert "truncated or corrupted" in _refused(capsys, f"resume={runs['truncated']}")
    assert "not an ftlab run directory" in _refused(capsys, f"resume={runs['not a run']}")
    assert "cannot change when a run resumes" in _refused(
        capsys, f"resume={runs['truncated']}", "optimizer.lr=1")
    assert {name: tree_digest(d) for name, d in runs.items()} == before


def test_resume_accepts_the_runs_own_command_line(tmp_path_factory, tmp_path, capsys):
    """Up-arrow + resume=..., or a SLURM requeue of the same command: equal values are no change."""
    done = cached_run(tmp_path_factory, *EXACT)
    run = crashed_copy(done, tmp_path / "run", keep="step-4.ckpt")
    before = tree_digest(run)

    # A changed value is refused, naming the setting, the saved value and the new one.
    longer = [a.replace("max_steps=7", "max_steps=8") for a in EXACT]
    msg = _refused(capsys, *FAST, *longer, f"resume={run}")
    assert "trainer.max_steps cannot change" in msg and "trainer.max_steps=7" in msg
    assert "trainer.max_steps=8" in msg
    msg = _refused(capsys, "model=tiny-gpt2", f"resume={run}")  # a group choice
    assert msg.startswith("ftlab: error: model cannot change") and "'tiny-llama'" in msg
    assert "'tiny-gpt2'" in msg
    msg = _refused(capsys, "optimizer.lr=1e-3", f"resume={run}")  # 1e-3 != the run's 1e-2
    assert "optimizer.lr=0.01" in msg and "optimizer.lr=0.001" in msg
    assert "method.r cannot change" in _refused(capsys, "method=lora", "method.r=4", f"resume={run}")
    assert tree_digest(run) == before

    # The whole command line that trained it (group choices, dotted keys, 1e-2 written as
    # Hydra parses it), plus resume=: accepted, and training continues exactly.
    resume(*FAST, *EXACT, "method=lora", "seed=42", f"resume={run}")
    assert_same_training(done, run, from_step=4, tol=0.0)


def test_latest_checkpoint_ignores_an_unfinished_temporary_file(tmp_path_factory, tmp_path):
    run = crashed_copy(cached_run(tmp_path_factory, *EXACT), tmp_path / "run", keep="step-4.ckpt")
    # what a kill in the middle of AtomicCheckpointIO's write leaves behind
    (run / "checkpoints" / ".last.ckpt.tmp-abc123").write_bytes(b"PK\x03\x04 half a zip")
    path, ckpt = latest_checkpoint(run)
    assert path.name == "step-4.ckpt" and ckpt["global_step"] == 4


# ---------------------------------------------------------------- the forms docs/resume.md names
# Logged to csv at every step, so what a resumed run writes to logs/ shows.
FORMS = ["data.batch_size=64", "trainer.max_steps=6", "checkpoint.every_n_steps=4",
         "trainer.val_check_interval=3", "eval.generate=false", "optimizer.lr=1e-2", "logger=csv",
         "trainer.log_every_n_steps=1"]


def test_resume_from_a_named_checkpoint_with_logging_turned_off(tmp_path_factory, tmp_path):
    """``resume=<run>/checkpoints/step-4.ckpt logger=none``: the named checkpoint, although a
    later one (last.ckpt, step 6) is there, and logger=none (an allowed change) is honoured:
    the csv log is left exactly as it was."""
    done = cached_run(tmp_path_factory, *FORMS)
    run = crashed_copy(done, tmp_path / "run", keep="step-4.ckpt")
    shutil.copy(done / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    assert latest_checkpoint(run)[1]["global_step"] == 6  # resume=<run> alone would take it
    log = (run / "logs" / "metrics.csv").read_bytes()

    resume(f"resume={run / 'checkpoints' / 'step-4.ckpt'}", "logger=none")
    assert_same_training(done, run, from_step=4, tol=0.0)
    assert (run / "logs" / "metrics.csv").read_bytes() == log


def test_resume_last_takes_the_newest_unfinished_run_under_outputs(tmp_path_factory, tmp_path, monkeypatch):
    """``resume=last`` from a directory holding ``outputs/``: the newest unfinished run is
    continued; a completed run with a newer checkpoint is left alone."""
    done = cached_run(tmp_path_factory, *FORMS)
    outputs = tmp_path / "outputs"
    older = crashed_copy(done, outputs / "2026-01-01" / "09-00-00_lora_tiny-llama", keep="step-4.ckpt")
    unfinished = crashed_copy(done, outputs / "2026-01-02" / "09-00-00_lora_tiny-llama", keep="step-4.ckpt")
    completed = outputs / "2026-01-03" / "09-00-00_lora_tiny-llama"
    shutil.copytree(done, completed)
    for when, run in enumerate((older, unfinished, completed)):
        for ckpt in (run / "checkpoints").glob("*.ckpt"):
            os.utime(ckpt, (1_800_000_000 + when, 1_800_000_000 + when))
    untouched = {run: tree_digest(run) for run in (older, completed)}

    monkeypatch.chdir(tmp_path)
    resume("resume=last")
    assert_same_training(done, unfinished, from_step=4, tol=0.0)
    assert {run: tree_digest(run) for run in (older, completed)} == untouched
