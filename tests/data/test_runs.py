"""Each data option runs end to end on the tiny model, and reports the right metrics."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from ftlab.settings import config_dir, settings_from_config
from ftlab.run import train

TINY = ["model=tiny-llama", "logger=none", "trainer.max_steps=3", "trainer.val_check_interval=3",
        "eval.max_examples=4", "eval.max_new_tokens=4", "data.batch_size=4", "checkpoint.every_n_steps=null",
        "trainer.enable_progress_bar=false"]


def run(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, *overrides], return_hydra_config=True)
    result = train(settings_from_config(cfg, str(tmp_path / "run")))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "completed"
    return result


def test_classification_reports_accuracy_and_f1(tmp_path, capsys):
    r = run(tmp_path, "data=classification")
    assert {"val_accuracy", "val_f1", "val_accuracy_initial", "val_f1_initial"} <= set(r)
    assert "val_exact_match" not in r and "val_perplexity" not in r
    assert r["data_stats"]["train"]["label_tokens"] == r["train_examples"]  # one label per example
    # A fraction of the held-out sentences (0.1 x 400 = 40): k / 40 for a whole k.
    n_val = r["data_stats"]["val"]["examples"]
    assert n_val == 40
    assert any(r["val_accuracy"] == pytest.approx(k / n_val, abs=1e-6) for k in range(n_val + 1))
    out = capsys.readouterr().out
    assert "labels: negative, positive" in out and "val_accuracy" in out and "val_f1" in out


def test_chat_with_packing(tmp_path, capsys):
    r = run(tmp_path, "data=chat", "data.packing=true")
    stats = r["data_stats"]["train"]
    assert stats["rows"] < stats["examples"] / 2 and stats["padding_efficiency"] > 0.85
    assert r["padding_efficiency"] > 0.85  # measured during training: few pad tokens computed
    assert "val_exact_match" in r and "val_perplexity" in r
    out = capsys.readouterr().out
    assert "packed into rows of 256 tokens" in out and "chat template: the model's own" in out


def test_text_blocks(tmp_path):
    r = run(tmp_path, "data=text", "data.group_by_length=true", "eval.before=false")
    assert "val_perplexity" in r and "val_exact_match" not in r
    assert r["data_stats"]["train"]["max_length"] == 256
