"""python -m ftlab.eval: a finished run, reloaded from its directory, scores what the run itself
reported at the end of training (and, with --base, before it)."""

from __future__ import annotations

import json
import math
import shutil
import string
from pathlib import Path

import pytest

from ftlab import eval as ftlab_eval
from tiny_runs import LORA, cached_run, cli, one_thread, tree_digest


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


GENERATIVE = ("val_loss", "val_perplexity", "val_token_accuracy", "val_exact_match", "val_answer_f1",
              "val_bleu", "val_rouge_l")


def recorded(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_eval_reproduces_the_end_of_training_metrics_and_shows_samples(tmp_path_factory, tmp_path):
    run = cached_run(tmp_path_factory, *LORA)
    out = tmp_path / "eval.json"
    proc = cli(str(run), "--json", str(out), module="ftlab.eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = json.loads(out.read_text()), recorded(run)
    for key in GENERATIVE:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert got["samples"] == want["samples"]  # the same greedy answers
    shown = [line for line in proc.stdout.splitlines() if " -> " in line and "(ref " in line]
    assert len(shown) == 2  # eval.show_samples: generations next to their references
    assert "run (end of training)" in proc.stdout


def test_base_flag_scores_the_untrained_model(tmp_path_factory, tmp_path, capsys):
    run = cached_run(tmp_path_factory, *LORA)
    out = tmp_path / "base.json"
    ftlab_eval.main([str(run), "--base", "--json", str(out)])
    got, want = json.loads(out.read_text()), recorded(run)
    assert got["model"] == "base"
    for key in GENERATIVE:
        assert got[key] == pytest.approx(want[f"{key}_initial"], abs=1e-6), key
    assert want["val_loss"] < want["val_loss_initial"]  # so before vs after is a real comparison
    assert "run (before training)" in capsys.readouterr().out


def test_eval_on_a_test_file(tmp_path_factory, tmp_path):
    run = cached_run(tmp_path_factory, *LORA)
    test = tmp_path / "test.jsonl"
    rows = [{"instruction": "Add the two numbers.", "input": f"{a} + {a}", "output": str(2 * a)}
            for a in (3, 5, 7)]
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = ftlab_eval.evaluate_run(run, data_file=str(test), samples=3)
    # The file's examples were scored (not the run's validation split), all three, in order.
    assert [s["reference"] for s in result["samples"]] == ["6", "10", "14"]
    assert result["val_loss"] != pytest.approx(recorded(run)["val_loss"], abs=1e-6)
    # Exact match recomputed from the recorded answers (SQuAD's normalisation: lower case, no
    # punctuation, articles or extra spaces).
    def normal(text: str) -> str:
        text = "".join(c for c in text.lower() if c not in string.punctuation)
        return " ".join(w for w in text.split() if w not in ("a", "an", "the"))

    matches = [normal(s["prediction"]) == normal(s["reference"]) for s in result["samples"]]
    assert result["val_exact_match"] == pytest.approx(sum(matches) / 3)
    assert result["val_perplexity"] == pytest.approx(math.exp(result["val_loss"]), rel=1e-5)


def test_classification_run_reports_accuracy_and_f1(tmp_path_factory):
    run = cached_run(tmp_path_factory, "data=classification", "trainer.max_steps=3", "optimizer.lr=1e-2")
    result, want = ftlab_eval.evaluate_run(run), recorded(run)
    for key in ("val_loss", "val_accuracy", "val_f1"):
        assert result[key] == pytest.approx(want[key], abs=1e-6), key
    assert "val_perplexity" not in result and "val_exact_match" not in result


def _refused(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        ftlab_eval.main(list(args))
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ftlab: error:")]
    assert len(errors) == 1
    return errors[0]


def test_bad_input_one_message_status_2_nothing_modified(tmp_path_factory, tmp_path, capsys):
    run = cached_run(tmp_path_factory, *LORA)
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(run / "config.yaml", untrained / "config.yaml")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "2 + 2?", "answer": "4"}\n')
    before = tree_digest(run), tree_digest(untrained)

    assert "holds no trained model" in _refused(capsys, str(untrained))
    msg = _refused(capsys, str(run), "--data", str(wrong))
    assert "wrong.jsonl" in msg and "instruction" in msg
    assert "no such run directory" in _refused(capsys, str(tmp_path / "missing"))
    assert "not an ftlab run directory" in _refused(capsys, str(tmp_path))
    assert "--max-examples" in _refused(capsys, str(run), "--max-examples", "0")
    assert (tree_digest(run), tree_digest(untrained)) == before
