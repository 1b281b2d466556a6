"""``python -m ftlab.report`` on damaged inputs: a metrics.json cut short (a job killed by an
older version mid-write, a full disk) or edited by hand (a value of another type, a field
removed or added) gives one located line (the file, the field) and exit status 2, or a
report; never a traceback. The edits are generated (hypothesis)."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ftlab import report

STRESS = os.environ.get("FTLAB_FUZZ_STRESS") == "1"
FUZZ = settings(max_examples=300 if STRESS else 15, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

# A completed job's metrics.json as a run writes it (trimmed to what the report reads).
JOB = {"status": "completed", "method": "lora", "model": "tiny-llama", "data": "tasks",
       "run_name": "lora-r8-a16-32-true", "seed": 42, "r": 8, "alpha": 16, "lr": 0.001, "precision": "32-true",
       "quantization": "none", "trainable_params": 3584, "total_params": 112448, "validation": "on",
       "val_loss": 5.6269, "val_perplexity": 277.79, "val_token_accuracy": 0.0, "val_exact_match": 0.25,
       "best": {"metric": "val/loss", "mode": "min", "value": 5.6269, "step": 6}, "tokens_per_second": 8644.7,
       "steps": 6, "peak_memory_mb": 552.7, "wall_time_s": 2.54, "outside_training_share": 0.95,
       "val_history": [{"step": 2, "val_loss": 5.638}, {"step": 6, "val_loss": 5.6269}],
       "train_loss_history": [[1, 5.66], [2, 5.66]], "overrides": ["method=lora", "seed=42"]}

value = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                     lambda inner: st.one_of(st.lists(inner, max_size=3),
                                             st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                     max_leaves=6)
edit = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(sorted(JOB)), value),
    st.tuples(st.just("drop"), st.sampled_from(sorted(JOB)), st.none()),
    st.tuples(st.just("add"), st.text(max_size=8), value),
    st.tuples(st.just("history"), st.integers(0, 1), value),
)


def write_sweep(root: Path, metrics_text: str) -> Path:
    """Two good jobs and the damaged one (job 2)."""
    for i in (0, 1):
        job = copy.deepcopy(JOB)
        job["overrides"] = ["method=lora", f"seed={42 + i}"]
        (root / f"{i}_lora").mkdir(parents=True)
        (root / f"{i}_lora" / "metrics.json").write_text(json.dumps(job))
    (root / "2_lora").mkdir()
    (root / "2_lora" / "metrics.json").write_text(metrics_text)
    return root / "2_lora" / "metrics.json"


def run_report(root: Path, damaged: Path, capsys) -> None:
    capsys.readouterr()
    try:
        report.main([str(root)])
    except SystemExit as exc:
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("ftlab.report: error:")]
        assert exc.code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert str(damaged) in lines[0], lines[0]
        return
    assert (root / "jobs.csv").is_file()


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(json.dumps(JOB)) - 1))
def test_truncated_metrics_json_is_named(cut, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        damaged = write_sweep(Path(tmp), json.dumps(JOB)[:cut])
        with pytest.raises(SystemExit) as exc:
            report.main([tmp])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"ftlab.report: error: {damaged} is not valid JSON" in err, err


@FUZZ
@given(edits=st.lists(edit, min_size=1, max_size=3))
def test_hand_edited_metrics_json_is_reported_or_named(edits, capsys):
    job = copy.deepcopy(JOB)
    for kind, key, new in edits:
        if kind in ("set", "add"):
            job[key] = new
        elif kind == "drop":
            job.pop(key, None)
        elif isinstance(job.get("val_history"), list) and len(job["val_history"]) > key:
            job["val_history"][key] = new
    with tempfile.TemporaryDirectory() as tmp:
        damaged = write_sweep(Path(tmp), json.dumps(job))
        run_report(Path(tmp), damaged, capsys)


@pytest.mark.parametrize("text", ["[]", "null", "3", '"completed"', "[" * 5000 + "]" * 5000])
def test_metrics_json_that_is_not_an_object(text, tmp_path, capsys):
    damaged = write_sweep(tmp_path, text)
    run_report(tmp_path, damaged, capsys)
    assert not (tmp_path / "jobs.csv").exists()
