"""Sweeps (Hydra multirun, sweep files, Optuna), W&B offline logging, and ftlab.report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from conftest import TINY, assert_usage_error, run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, object]:
    """Three jobs on the tiny model; the first has an invalid rank and must fail alone."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "grid"
    proc = run_cli("-m", *TINY, "method.r=0,2,4", "method.alpha=8", f"hydra.sweep.dir={sweep_dir}")
    return sweep_dir, proc


def test_a_failing_job_is_recorded_and_the_rest_still_run(sweep):
    sweep_dir, proc = sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {json.loads(p.read_text())["status"]: json.loads(p.read_text())
            for p in sweep_dir.glob("*/metrics.json")}
    results = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/metrics.json"))]
    assert [r["status"] for r in results] == ["failed", "completed", "completed"]
    assert "method.r must be a positive integer, got 0" in results[0]["error"]
    assert [r["r"] for r in results[1:]] == [2, 4]
    assert jobs  # every job left a metrics.json in its own directory
    assert len({p.parent for p in sweep_dir.glob("*/metrics.json")}) == 3


def test_report_rows_match_the_jobs_metrics(sweep):
    sweep_dir, _ = sweep
    proc = run_cli(str(sweep_dir), module="ftlab.report")
    assert proc.returncode == 0, proc.stderr
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + 3  # header + one row per job
    with open(sweep_dir / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    by_job = {r["job"]: r for r in rows}
    for path in sweep_dir.glob("*/metrics.json"):
        m = json.loads(path.read_text())
        row = by_job[path.parent.name]
        assert row["status"] == m["status"]
        if m["status"] == "completed":
            assert int(row["trainable_params"]) == m["trainable_params"]
            assert float(row["val_loss"]) == pytest.approx(m["val_loss"])
            assert float(row["tokens_per_second"]) == pytest.approx(m["tokens_per_second"])
            assert row["method"] == "lora" and int(row["r"]) == m["r"]
        else:
            assert "positive integer" in row["error"]


def test_report_plots_are_valid_pngs(sweep):
    import matplotlib.image

    sweep_dir, _ = sweep
    run_cli(str(sweep_dir), module="ftlab.report")
    for name in ("val_loss_curves.png", "pareto.png"):
        data = (sweep_dir / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        image = matplotlib.image.imread(sweep_dir / name)
        assert image.shape[0] > 100 and image.shape[1] > 100


def test_a_classification_sweep_reports_accuracy_and_plots_it(tmp_path):
    """On classification data the task metric is accuracy: in the table (with macro F1) and on
    the Pareto plot's axis; the exact-match column of generation data is left out."""
    from ftlab.report import collect, plot_pareto

    sweep_dir = tmp_path / "cls"
    proc = run_cli("-m", *TINY, "model=tiny-bert", "data=classification", "method=lora,ia3",
                   f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(str(sweep_dir), module="ftlab.report")
    assert proc.returncode == 0, proc.stderr
    header, _, *rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert "val_accuracy" in columns and "val_f1" in columns and "val_exact_match" not in columns
    for row in rows:
        cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|"))))
        m = json.loads((sweep_dir / cells["job"] / "metrics.json").read_text())
        assert cells["val_accuracy"] == f"{100 * m['val_accuracy']:.1f}%"
    assert plot_pareto(collect(sweep_dir), tmp_path / "p.png") == "val_accuracy"


def test_report_shows_each_jobs_learning_rate_and_the_columns_asked_for(sweep):
    sweep_dir, _ = sweep
    proc = run_cli(str(sweep_dir), "--columns", "job,lr,val_loss,status", module="ftlab.report")
    assert proc.returncode == 0, proc.stderr
    header, _, *rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    assert [c.strip() for c in header.strip("|").split("|")] == ["job", "lr", "val_loss", "status"]
    for row in rows:
        job, lr, _, status = (c.strip() for c in row.strip("|").split("|"))
        config = yaml.safe_load((sweep_dir / job / "config.yaml").read_text()) if status == "completed" else None
        if config:
            assert float(lr) == config["optimizer"]["lr"]
    bad = run_cli(str(sweep_dir), "--columns", "job,speed", module="ftlab.report")
    assert bad.returncode == 2 and "unknown column(s) speed" in bad.stderr


def test_pareto_front():
    from ftlab.report import pareto_front

    # (trainable params, exact match): the 2nd is beaten by the 1st (fewer params, better).
    points = [(10, 0.5), (20, 0.4), (30, 0.7), (30, 0.6), (5, 0.1)]
    assert pareto_front(points, higher_is_better=True) == [0, 2, 4]
    assert pareto_front([(10, 1.0), (20, 0.5)], higher_is_better=False) == [0, 1]


def test_labels_of_coinciding_points_are_stacked():
    from ftlab.report import _label_lifts

    # Four methods at one parameter count and score (LoRA, DoRA, PiSSA, Delta-LoRA), one apart.
    points = [(460_800, 0.575), (483_840, 0.575), (460_800, 0.575), (11_520, 0.0), (460_800, 0.575)]
    assert _label_lifts(points) == [0, 1, 2, 0, 3]


def test_report_on_a_directory_without_results(tmp_path):
    proc = run_cli(str(tmp_path), module="ftlab.report")
    assert proc.returncode == 2
    assert "no job results (metrics.json)" in proc.stderr and "Traceback" not in proc.stderr


def test_sweep_files_compose(tmp_path):
    """Every sweeps/*.yaml names only keys and options that exist (checked by the preflight)."""
    from ftlab.cli import preflight
    from ftlab.settings import sweeps_dir
    from ftlab.sweeps import expand_sweep

    for path in sorted(sweeps_dir().glob("*.yaml")):
        argv = expand_sweep([f"sweep={path.stem}", f"hydra.sweep.dir={tmp_path / path.stem}"])
        assert argv[0] == "-m"
        pinned = preflight(argv)
        assert f"hydra.sweep.dir={tmp_path / path.stem}" in pinned


def test_unknown_sweep_and_unknown_parameter_exit_2(tmp_path):
    assert_usage_error(run_cli("sweep=method"), "no sweep named 'method'", "did you mean 'methods'")
    assert_usage_error(run_cli("-m", "model=tiny-llama", "method.rnk=2,4",
                               f"hydra.sweep.dir={tmp_path / 's'}"), "method.rnk")
    assert not (tmp_path / "s").exists()


def test_optuna_sweep_returns_val_loss_to_the_sweeper(tmp_path):
    sweep_dir = tmp_path / "optuna"
    proc = run_cli("sweep=lr_search", *TINY, "trainer.max_steps=2", "hydra.sweeper.n_trials=2",
                   f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    losses = [json.loads(p.read_text())["val_loss"] for p in sweep_dir.glob("*/metrics.json")]
    assert len(losses) == 2
    assert best["best_value"] == pytest.approx(min(losses))


def test_wandb_falls_back_to_offline_and_never_writes_the_key(tmp_path):
    secret = "ftlab-test-secret-key-0123456789abcdef0123"
    run_dir = tmp_path / "wandb-run"
    proc = run_cli(*TINY[:-1], "logger=wandb", f"hydra.run.dir={run_dir}",
                   env={"WANDB_API_KEY": secret, "WANDB_MODE": "", "WANDB_BASE_URL": "http://127.0.0.1:9"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("logging offline") == 1
    assert "wandb sync" in proc.stderr
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert secret not in proc.stdout + proc.stderr
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
