"""The "before training" scores are computed once and reused by runs whose method starts as
the identity; training goes on identically either way, and other methods always evaluate."""

from __future__ import annotations

import json

from conftest import TINY, run_cli

RUN = [*TINY, "eval.max_examples=2", "trainer.max_steps=2", "checkpoint.every_n_steps=null"]


def metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_identity_methods_reuse_the_before_scores_and_train_identically(tmp_path):
    env = {"FTLAB_CACHE": str(tmp_path / "cache")}
    first, second, vera = tmp_path / "first", tmp_path / "second", tmp_path / "vera"
    for run_dir, extra in ((first, ["method=lora"]), (second, ["method=lora"]), (vera, ["method=ia3"])):
        proc = run_cli(*RUN, *extra, f"hydra.run.dir={run_dir}", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b, c = metrics(first), metrics(second), metrics(vera)
    assert "eval_before_reused" not in a and b["eval_before_reused"] and c["eval_before_reused"]
    assert len(list((tmp_path / "cache" / "evals").glob("*.json"))) == 1
    initial = {k: v for k, v in a.items() if k.endswith("_initial")}
    assert initial and {k: b[k] for k in initial} == initial == {k: c[k] for k in initial}
    # Skipping the evaluation changed nothing in training: same losses, same final scores.
    assert a["train_loss_history"] == b["train_loss_history"]
    assert a["val_loss"] == b["val_loss"]


def test_methods_that_change_the_model_at_init_always_evaluate(tmp_path):
    env = {"FTLAB_CACHE": str(tmp_path / "cache")}
    for i, method in enumerate(("lora", "prompt_tuning")):
        run_dir = tmp_path / f"run{i}"
        proc = run_cli(*RUN, f"method={method}", f"hydra.run.dir={run_dir}", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "eval_before_reused" not in metrics(run_dir), method
    lora, prompt = metrics(tmp_path / "run0"), metrics(tmp_path / "run1")
    assert lora["val_loss_initial"] != prompt["val_loss_initial"]  # the virtual tokens change the model


def test_a_changed_data_file_is_evaluated_again(tmp_path):
    env = {"FTLAB_CACHE": str(tmp_path / "cache")}
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"say {w}", "output": w} for w in ("one", "two", "three", "four", "five", "six")]
    for i, extra in enumerate((rows, rows + [{"instruction": "say seven", "output": "seven"}])):
        data.write_text("".join(json.dumps(r) + "\n" for r in extra))
        run_dir = tmp_path / f"run{i}"
        proc = run_cli(*RUN, f"data.path={data}", "data.val_fraction=0.5", f"hydra.run.dir={run_dir}", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "eval_before_reused" not in metrics(run_dir)
