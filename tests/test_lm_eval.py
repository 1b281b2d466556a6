"""``ftlab.eval RUN --lm-eval TASKS``: a trained run scored with lm-evaluation-harness on a tiny
multiple-choice task shipped in tests/lm_eval_tasks/ (YAML + JSONL, offline), checked against
log-likelihoods computed here from the reloaded model; lm_eval.json in ftlab.report; bad input."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import torch

from ftlab import eval as ftlab_eval
from ftlab.metrics import lm_harness
from ftlab.report import report
from tiny_runs import LORA, cached_run, one_thread, tree_digest

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
TASK = "ftlab_tiny_mc"
ROWS = [json.loads(line) for line in (TASKS_DIR / "tiny_mc.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture
def run(tmp_path_factory, tmp_path) -> Path:
    """A copy of the shared tiny LoRA run (lm-eval writes into the run directory)."""
    source = cached_run(tmp_path_factory, *LORA)
    return Path(shutil.copytree(source, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints")))


def choice_logliks(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """log P(" " + choice | context) for each choice, summed over the choice's tokens."""
    out = []
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    for choice in choices:
        whole = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
        assert whole[: len(ctx)] == ctx  # the byte-level tokenizer splits context and choice cleanly
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([whole])).logits[0].float()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        out.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
    return out


def test_lm_eval_scores_the_trained_model_and_writes_lm_eval_json(run, capsys):
    pytest.importorskip("lm_eval")
    from ftlab.rundir import load_run

    ftlab_eval.main([str(run), "--lm-eval", TASK, "--lm-eval-tasks-dir", str(TASKS_DIR), "--lm-eval-samples"])
    printed = capsys.readouterr().out
    assert f"{TASK}" in printed and "acc_norm" in printed and "wrote" in printed

    data = json.loads((run / "lm_eval.json").read_text())
    assert (data["model"], data["method"], data["artifact"]) == ("trained", "lora", "adapter")
    entry = data["tasks"][TASK]
    assert set(entry["metrics"]) == {"acc", "acc_norm"}
    assert entry["n"] == entry["n_total"] == len(ROWS) == 7
    assert entry["num_fewshot"] == 0 and entry["limit"] is None and entry["output_type"] == "multiple_choice"
    assert entry["lm_eval_version"] == lm_harness.lm_eval_version()
    assert len(entry["config_sha256"]) == len(entry["docs_sha256"]) == 64
    assert entry["source"] == str((TASKS_DIR / "tiny_mc.yaml").resolve())

    # The same numbers from the reloaded model's own log-likelihoods of the choices.
    loaded = load_run(run)
    correct, correct_norm = [], []
    samples = [json.loads(line) for line in (run / "lm_eval_samples" / f"{TASK}.jsonl").read_text().splitlines()]
    assert [s["doc_id"] for s in samples] == list(range(len(ROWS)))
    for row, sample in zip(ROWS, samples):
        ll = choice_logliks(loaded.model, loaded.tokenizer, f"Question: {row['question']}\nAnswer:", row["choices"])
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(ll, abs=1e-4)
        best = max(range(len(ll)), key=ll.__getitem__)
        best_norm = max(range(len(ll)), key=lambda i: ll[i] / len(row["choices"][i]))  # lm-eval: per character
        correct.append(float(best == row["answer"]))
        correct_norm.append(float(best_norm == row["answer"]))
    for metric, hits in (("acc", correct), ("acc_norm", correct_norm)):
        got = entry["metrics"][metric]
        assert got["value"] == pytest.approx(statistics.mean(hits), abs=1e-12), metric
        assert got["stderr"] == pytest.approx(statistics.stdev(hits) / math.sqrt(len(hits)), rel=1e-9), metric

    # A second task run later is added; the first is kept.
    lm_harness.write_results(run, {"other_task": {"metrics": {"acc": {"value": 0.5, "stderr": None}}}},
                             {"model": "trained"})
    kept = json.loads((run / "lm_eval.json").read_text())["tasks"]
    assert set(kept) == {TASK, "other_task"} and kept[TASK] == entry


def _fake_run(root: Path, name: str, seed: int, method: str, acc: float) -> None:
    job = root / name
    job.mkdir(parents=True)
    (job / "metrics.json").write_text(json.dumps({
        "status": "completed", "method": method, "model": "tiny-llama", "seed": seed, "lr": 1e-3,
        "val_loss": 1.0 + acc, "trainable_params": 100, "overrides": [f"method={method}", f"seed={seed}"]}))
    lm_harness.write_results(job, {TASK: {"metrics": {"acc": {"value": acc, "stderr": 0.1},
                                                      "perplexity": {"value": 10 * acc, "stderr": None}}}},
                             {"model": "trained"})


def test_report_shows_lm_eval_metrics_as_columns_over_seeds(tmp_path):
    accs = {("lora", 1): 0.50, ("lora", 2): 0.70, ("vera", 1): 0.25, ("vera", 2): 0.35}
    for i, ((method, seed), acc) in enumerate(accs.items()):
        _fake_run(tmp_path, f"{i}", seed, method, acc)
    table = report(tmp_path)
    header = table.splitlines()[0]
    assert f"{TASK}/acc" in header and f"{TASK}/perplexity" in header
    lora = next(line for line in table.splitlines() if line.startswith("| method=lora"))
    assert "60.0% ± 14.1%" in lora  # mean and sample standard deviation of 50% and 70%, as a percentage
    summary = (tmp_path / "report.csv").read_text().splitlines()
    fields = summary[0].split(",")
    assert f"{TASK}/acc_mean" in fields and f"vs_baseline_{TASK}/acc_diff" in fields
    jobs = (tmp_path / "jobs.csv").read_text().splitlines()
    assert f"{TASK}/acc" in jobs[0].split(",")


def _refused(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        ftlab_eval.main(list(args))
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ftlab: error:")]
    assert len(errors) == 1
    return errors[0]


def test_bad_input_one_message_before_any_weights_load(run, capsys, monkeypatch):
    before = tree_digest(run)
    assert "--lm-eval-limit" in _refused(capsys, str(run), "--lm-eval", TASK, "--lm-eval-limit", "0")
    assert "--lm-eval-batch-size" in _refused(capsys, str(run), "--lm-eval", TASK, "--lm-eval-batch-size", "x")
    assert "without --lm-eval" in _refused(capsys, str(run), "--lm-eval-fewshot", "2")
    assert "--data" in _refused(capsys, str(run), "--lm-eval", TASK, "--data", "x.jsonl")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
        assert "pip install 'ftlab[lmeval]'" in _refused(capsys, str(run), "--lm-eval", TASK)
    if pytest.importorskip("lm_eval"):
        msg = _refused(capsys, str(run), "--lm-eval", "ftlab_tiny_mcq", "--lm-eval-tasks-dir", str(TASKS_DIR))
        assert "unknown lm-eval task 'ftlab_tiny_mcq'" in msg and f"did you mean {TASK}" in msg
        assert "no such directory" in _refused(capsys, str(run), "--lm-eval", TASK,
                                               "--lm-eval-tasks-dir", str(run / "missing"))
    assert tree_digest(run) == before
