"""Select on validation, report on test: a run with a held-out test split scores it once, after
training, with the model it keeps (``test_*`` in metrics.json), leaving the validation curve
alone; the report's headline scores are the test split's, while the learning rate and the
baseline are still chosen on validation loss (jobs below where validation and test disagree)."""

from __future__ import annotations

import csv

import pytest
from conftest import run_cli
from test_report_seeds import completed, write_job
from tiny_runs import one_thread, train_run

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def test_run_scores_the_test_split_with_the_kept_model(tmp_path, capsys):
    # monitor.mode=max on val/loss keeps the *worst* validation: a best model that is not the
    # last one, so the test must be scored on the reloaded best weights.
    m = train_run(tmp_path / "run", "trainer.max_steps=6", "optimizer.lr=2e-2", "data.test_fraction=0.1",
                  "monitor.mode=max")
    assert m["test_examples"] == 40 and m["val_examples"] == 36
    for k in ("test_loss", "test_perplexity", "test_token_accuracy", "test_exact_match", "test_answer_f1"):
        assert isinstance(m[k], float), k
    assert len(m["test_samples"]) > 0 and "samples" in m
    best = m["best"]
    assert best["step"] != best["last_step"] and best["adapter"].startswith("best_")
    assert m["test_model"] == "best" and m["test_step"] == best["step"]
    # The validation curve holds validation points only (the test pass added none).
    assert [h["step"] for h in m["val_history"]] == [2, 4, 6]
    assert m["val_history"][-1]["val_loss"] == pytest.approx(m["val_loss"])
    assert m["test_loss"] != pytest.approx(m["val_loss"])
    out = capsys.readouterr().out
    assert "Result on the held-out splits (test: 40 examples, best model):" in out
    row = next(ln.split() for ln in out.splitlines() if ln.strip().startswith("loss "))
    assert row == ["loss", "-", f"{m['val_loss']:.4f}", f"{m['test_loss']:.4f}"]


def _sweep(root):
    """lora and vera at two learning rates, 3 seeds: by validation loss lora's lr_scale=1 and
    vera's lr_scale=3 win; by test loss the other rate would (it must not matter)."""
    val = {("lora", "1"): 0.50, ("lora", "3"): 0.60, ("vera", "1"): 0.90, ("vera", "3"): 0.80}
    test = {("lora", "1"): 0.70, ("lora", "3"): 0.40, ("vera", "1"): 0.30, ("vera", "3"): 0.95}
    num = 0
    for (method, scale), v in val.items():
        for seed in (1, 2, 3):
            jitter = 0.01 * seed
            write_job(root, num, [f"method={method}", f"lr_scale={scale}", f"seed={seed}"],
                      completed(method, seed, v + jitter, lr=float(scale) * 1e-3,
                                val_exact_match=0.5, test_loss=test[method, scale] + jitter,
                                test_exact_match=1 - test[method, scale] + jitter / 2,
                                test_answer_f1=0.5, test_examples=40))
            num += 1
    return root


def test_selection_ignores_the_test_split_and_the_headline_is_test(tmp_path):
    from ftlab.compare import baseline_config, collect, group, task_metric

    root = _sweep(tmp_path / "sweep")
    configs = group(collect(root), root)
    assert {c.label for c in configs if c.selected} == {"method=lora lr_scale=1", "method=vera lr_scale=3"}
    assert baseline_config(configs, "lora").label == "method=lora lr_scale=1"
    assert task_metric(configs) == ("test_exact_match", "exact match (test)")

    proc = run_cli(str(root), module="ftlab.report")
    assert proc.returncode == 0, proc.stderr
    header = next(ln for ln in proc.stdout.splitlines() if ln.startswith("| config"))
    assert "test_loss" in header and "test_exact_match" in header and "val_exact_match" not in header
    assert "vs lora (test_loss)" in header and "vs lora (test_exact_match)" in header
    assert "scores on the held-out test split (n=40 examples)" in proc.stdout
    shown = [ln.split("|")[1].strip() for ln in proc.stdout.splitlines() if ln.startswith("| method=")]
    assert shown == ["method=lora lr_scale=1", "method=vera lr_scale=3"]
    with open(root / "report.csv") as fh:
        vera = next(r for r in csv.DictReader(fh) if r["config"] == "method=vera lr_scale=3")
    # vera (0.95 + jitter) against lora (0.70 + the same jitter): +0.25 on every seed.
    assert float(vera["vs_baseline_test_loss_diff"]) == pytest.approx(0.25)
    assert float(vera["test_loss_mean"]) == pytest.approx(0.97)
