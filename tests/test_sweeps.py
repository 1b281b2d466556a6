"""Sweeps (Hydra multirun, sweep files, Optuna), W&B offline logging, and ftlab.report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from conftest import TINY, assert_usage_error, run_cli, tiny_lora_params

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
    results = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/metrics.json"))]
    assert [r["status"] for r in results] == ["failed", "completed", "completed"]
    assert "method.r must be a positive integer, got 0" in results[0]["error"]
    # The jobs trained ranks 2 and 4: r * (d_in + d_out) per adapted layer (conftest.py).
    assert [r["trainable_params"] for r in results[1:]] == [tiny_lora_params(2), tiny_lora_params(4)]
    # every job left a metrics.json in its own directory
    assert len({p.parent for p in sweep_dir.glob("*/metrics.json")}) == 3


def test_report_rows_match_the_jobs_metrics(sweep):
    sweep_dir, _ = sweep
    proc = run_cli(str(sweep_dir), module="ftlab.report")
    assert proc.returncode == 0, proc.stderr
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + 3  # header + one row per job
    with open(sweep_dir / "jobs.csv") as fh:
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


def test_seeds_adds_a_seed_axis_to_the_grid():
    from ftlab.errors import ConfigError
    from ftlab.sweeps import expand_sweep

    argv = expand_sweep(["sweep=ranks", "seeds=3", "hydra.sweep.dir=x"])
    assert argv[0] == "-m" and argv[-1] == "seed=42,43,44" and "seeds=3" not in argv  # conf/train.yaml: 42
    assert expand_sweep(["-m", "method=lora,ia3", "seed=7", "seeds=2"]) == ["-m", "method=lora,ia3", "seed=7,8"]
    assert expand_sweep(["method=lora", "seeds=2"]) == ["-m", "method=lora", "seed=42,43"]
    assert expand_sweep(["method=lora", "seeds=1"]) == ["method=lora", "seed=42"]
    for bad, needle in ((["seeds=0"], "positive integer"), (["seeds=2", "seed=1,2"], "seeds=N or a list"),
                        (["sweep=lr_search", "seeds=2"], "Optuna")):
        with pytest.raises(ConfigError, match=needle):
            expand_sweep(bad)


@pytest.fixture(scope="module")
def seeded_sweep(tmp_path_factory) -> tuple[Path, list[str]]:
    """Two methods x seeds=2 on the tiny model (4 jobs), by the real CLI."""
    sweep_dir = tmp_path_factory.mktemp("seeded") / "grid"
    args = ["-m", *TINY, "trainer.max_steps=2", "method=lora,ia3", "seeds=2", f"hydra.sweep.dir={sweep_dir}"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir, args


def test_seeds_change_the_run_not_the_split_and_the_report_groups_them(seeded_sweep):
    sweep_dir, _ = seeded_sweep
    jobs = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/metrics.json"))]
    assert [(j["method"], j["seed"]) for j in jobs] == [("lora", 42), ("lora", 43), ("ia3", 42), ("ia3", 43)]
    for a, b in (jobs[:2], jobs[2:]):
        assert a["data_stats"] == b["data_stats"]  # data.seed fixes the split: the same examples
        assert a["val_loss"] != b["val_loss"]      # seed changes init, order and dropout
    proc = run_cli(str(sweep_dir), module="ftlab.report")
    assert proc.returncode == 0, proc.stderr
    with open(sweep_dir / "report.csv") as fh:
        table = list(csv.DictReader(fh))
    rows = {r["method"]: r for r in table}
    assert len(table) == 2  # one row per configuration, no phantom cells from the grid
    lora = [j["val_loss"] for j in jobs[:2]]
    assert rows["lora"]["n"] == "2" and rows["lora"]["seeds"] == "2/2"
    assert float(rows["lora"]["val_loss_mean"]) == pytest.approx(sum(lora) / 2)
    assert float(rows["lora"]["val_loss_std"]) == pytest.approx(abs(lora[0] - lora[1]) / 2 ** 0.5)
    assert rows["ia3"]["vs_baseline_val_loss_pairs"] == "2" and rows["ia3"]["baseline"] == "method=lora"
    assert "| method=ia3 |" in proc.stdout and "| baseline |" in proc.stdout


def test_running_the_same_sweep_again_skips_completed_jobs(seeded_sweep):
    sweep_dir, args = seeded_sweep
    before = {p: p.read_text() for p in sweep_dir.glob("*/metrics.json")}
    interrupted = sweep_dir / "3_ia3" / "metrics.json"
    record = json.loads(interrupted.read_text())
    interrupted.write_text(json.dumps({**record, "status": "running"}))  # as if killed mid-run
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "continuing the sweep" in out and out.count("already completed in") == 3
    for path, text in before.items():
        if path != interrupted:
            assert path.read_text() == text  # untouched
    again = json.loads(interrupted.read_text())
    assert again["status"] == "completed" and again["seed"] == 43 and again["method"] == "ia3"
    # A job directory that holds another configuration is left alone.
    changed = run_cli(*[a.replace("eval.max_examples=4", "eval.max_examples=3") for a in args])
    assert changed.returncode == 0
    assert (changed.stdout + changed.stderr).count("holds a completed job with another configuration") == 4
    assert json.loads(interrupted.read_text()) == again


def test_lr_per_method_sweep_searches_around_each_default_and_the_report_selects(tmp_path):
    """sweeps/lr_per_method.yaml on two methods: each at default/3, default and 3x default
    (conf/method/*.yaml lr), and the report shows one selected rate per method."""
    from omegaconf import OmegaConf

    from ftlab.settings import config_dir

    sweep_dir = tmp_path / "lr"
    proc = run_cli("sweep=lr_per_method", *TINY, "trainer.max_steps=1", "trainer.val_check_interval=1",
                   "eval.generate=false", "method=lora,vera", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lrs: dict[str, list[float]] = {}
    for path in sorted(sweep_dir.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        lrs.setdefault(m["method"], []).append(m["lr"])
    assert sorted(lrs) == ["lora", "vera"]
    for method, got in lrs.items():
        own = float(OmegaConf.load(config_dir() / "method" / f"{method}.yaml")["lr"])
        assert got == pytest.approx([own / 3, own, 3 * own], rel=1e-9), method
    proc = run_cli(str(sweep_dir), module="ftlab.report")
    assert proc.returncode == 0, proc.stderr
    with open(sweep_dir / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    for method in ("lora", "vera"):
        mine = [r for r in rows if r["method"] == method]
        best = min(mine, key=lambda r: float(r["val_loss_mean"]))
        assert [r["selected"] for r in mine].count("True") == 1 and best["selected"] == "True"
    assert "learning rate selected per method" in proc.stdout
