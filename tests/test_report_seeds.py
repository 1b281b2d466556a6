"""ftlab.report over seeds, on synthetic sweep directories (metrics.json written by the test):
grouping by everything but the seed, aggregates with t-intervals, failed and missing seeds,
the paired t-test against a baseline, and learning-rate selection. Reference numbers come from
scipy.stats directly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from scipy import stats as sp

# val_loss per seed (1, 2, 3, 4); None: failed; absent: never ran.
LOSSES = {"lora": {1: 0.50, 2: 0.52, 3: 0.47, 4: 0.49},
          "vera": {1: 0.60, 2: 0.63, 3: 0.56, 4: None},     # clearly worse than lora
          "ia3": {1: 0.51, 2: 0.50, 3: 0.49}}                # within lora's noise; seed 4 missing
PARAMS = {"lora": 3584, "vera": 600, "ia3": 384}


def write_job(root: Path, num: int, overrides: list[str], metrics: dict) -> None:
    job = root / f"{num}_{metrics.get('method', 'x')}"
    job.mkdir(parents=True)
    (job / "metrics.json").write_text(json.dumps({**metrics, "overrides": overrides}))


def completed(method: str, seed: int, loss: float, **extra) -> dict:
    return {"status": "completed", "method": method, "seed": seed, "lr": 1e-3, "val_loss": loss,
            "trainable_params": PARAMS.get(method, 1000), "peak_memory_mb": 500.0 + seed,
            "wall_time_s": 10.0 + seed, "tokens_per_second": 100.0 * seed,
            "val_history": [{"step": 0, "val_loss": 5.0}, {"step": 2, "val_loss": loss}], **extra}


@pytest.fixture
def seeded(tmp_path) -> Path:
    return make_sweep(tmp_path / "sweep")


def make_sweep(root: Path) -> Path:
    num = 0
    for method, losses in LOSSES.items():
        for seed, loss in losses.items():
            overrides = ["model=tiny-llama", f"method={method}", f"seed={seed}"]
            if loss is None:
                write_job(root, num, overrides, {"status": "failed", "error": "boom"})
            else:
                write_job(root, num, overrides, completed(method, seed, loss))
            num += 1
    # The grid the sweep asked for (Hydra's multirun.yaml): adapter never started.
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": [
        "model=tiny-llama", "method=lora,vera,ia3,adapter", "seed=1,2,3,4"]}}}))
    return root


def rows(path: Path) -> dict[str, dict]:
    with open(path) as fh:
        return {r["method"]: r for r in csv.DictReader(fh)}


def test_aggregates_skip_failed_jobs_and_mark_missing_cells(seeded):
    proc = run_cli(str(seeded), module="ftlab.report")
    assert proc.returncode == 0, proc.stderr
    by_method = rows(seeded / "report.csv")
    for method, losses in LOSSES.items():
        values = [v for v in losses.values() if v is not None]
        row = by_method[method]
        assert int(row["n"]) == int(row["val_loss_n"]) == len(values)
        assert float(row["val_loss_mean"]) == pytest.approx(sp.tmean(values), rel=1e-12)
        assert float(row["val_loss_std"]) == pytest.approx(sp.tstd(values), rel=1e-12)
        low, high = sp.t.interval(0.95, len(values) - 1, loc=sp.tmean(values), scale=sp.sem(values))
        assert (float(row["val_loss_ci95_low"]), float(row["val_loss_ci95_high"])) == pytest.approx((low, high))
        assert int(row["expected"]) == 4
    assert by_method["vera"]["failed"] == "1" and by_method["vera"]["seeds"] == "3/4 (1 failed)"
    assert by_method["ia3"]["missing_seeds"] == "4" and by_method["ia3"]["seeds"] == "3/4 (missing seed 4)"
    assert by_method["adapter"]["n"] == "0" and by_method["adapter"]["missing_seeds"] == "1 2 3 4"
    # The printed table says the same: one row per configuration, its seeds cell.
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("| method=")]
    assert len(lines) == 4
    assert any("| 0/4 (missing seed 1, 2, 3, 4) |" in ln for ln in lines)
    lora = next(ln for ln in lines if ln.startswith("| method=lora "))
    s = sp.tstd([0.50, 0.52, 0.47, 0.49])
    assert f"0.4950 ± {s:.4f} [" in lora
    # jobs.csv keeps one row per job, failed ones with their error.
    with open(seeded / "jobs.csv") as fh:
        jobs = list(csv.DictReader(fh))
    assert len(jobs) == 11 and sum(j["status"] == "failed" for j in jobs) == 1


def test_paired_t_test_against_the_baseline(seeded):
    proc = run_cli(str(seeded), module="ftlab.report")  # lora is the default baseline
    assert proc.returncode == 0, proc.stderr
    by_method = rows(seeded / "report.csv")
    lora = LOSSES["lora"]
    for method, significant in (("vera", True), ("ia3", False)):
        seeds = [s for s, v in LOSSES[method].items() if v is not None]  # pairs: the same seed
        ref = sp.ttest_rel([LOSSES[method][s] for s in seeds], [lora[s] for s in seeds])
        row = by_method[method]
        assert int(row["vs_baseline_val_loss_pairs"]) == 3
        assert float(row["vs_baseline_val_loss_p"]) == pytest.approx(ref.pvalue, rel=1e-9)
        assert bool(ref.pvalue < 0.05) == significant
        assert row["vs_baseline_val_loss_significant"] == str(significant)
    lines = {ln.split("|")[1].strip(): ln for ln in proc.stdout.splitlines() if ln.startswith("| method=")}
    assert "n.s." in lines["method=ia3"] and "n.s." not in lines["method=vera"]
    assert "| baseline |" in lines["method=lora"]
    assert "paired t-test" in proc.stdout
    # Another baseline, and one that is not there.
    assert run_cli(str(seeded), "--baseline", "vera", module="ftlab.report").returncode == 0
    assert rows(seeded / "report.csv")["lora"]["baseline"] == "method=vera"
    bad = run_cli(str(seeded), "--baseline", "dora", module="ftlab.report")
    assert bad.returncode == 2 and "no completed job of method 'dora'" in bad.stderr


def test_learning_rate_selected_per_method_by_validation_loss(tmp_path):
    """Per method, three learning rates x two seeds: the table shows the rate with the lowest
    mean validation loss; report.csv marks every rate selected or not."""
    from ftlab.compare import collect, group

    root = tmp_path / "lr"
    losses = {("lora", "0.333"): (0.60, 0.62), ("lora", "1"): (0.50, 0.54), ("lora", "3"): (0.70, 0.40),
              ("vera", "0.333"): (0.90, 0.92), ("vera", "1"): (0.85, 0.83), ("vera", "3"): (0.80, 0.82)}
    num = 0
    for (method, scale), pair in losses.items():
        for seed, loss in zip((1, 2), pair):
            write_job(root, num, [f"method={method}", f"lr_scale={scale}", f"seed={seed}"],
                      completed(method, seed, loss, lr=float(scale) * 1e-3))
            num += 1
    configs = group(collect(root), root)
    chosen = {c.first("method"): c.label for c in configs if c.selected}
    # lora: means 0.61, 0.52, 0.55 -> scale 1; vera: 0.91, 0.84, 0.81 -> scale 3.
    assert chosen == {"lora": "method=lora lr_scale=1", "vera": "method=vera lr_scale=3"}
    proc = run_cli(str(root), module="ftlab.report")
    assert proc.returncode == 0, proc.stderr
    shown = [ln.split("|")[1].strip() for ln in proc.stdout.splitlines() if ln.startswith("| method=")]
    assert shown == ["method=lora lr_scale=1", "method=vera lr_scale=3"]
    with open(root / "report.csv") as fh:
        assert sum(r["selected"] == "True" for r in csv.DictReader(fh)) == 2


def test_plots_have_error_bars_and_three_cost_panels(seeded, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ftlab.compare import collect, group
    from ftlab.plots import plot_pareto

    captured = {}
    original = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        captured["fig"] = fig
        return original(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        key = plot_pareto(group(collect(seeded), seeded), tmp_path / "pareto.png")
    finally:
        plt.Figure.savefig = original
    assert key == "val_loss"
    axes = captured["fig"].axes
    assert [ax.get_xlabel() for ax in axes] == ["trainable parameters (log scale)", "peak memory (MB)", "wall time (s)"]
    # lora's point: mean loss with a vertical error bar of the 95% t half-width.
    values = [0.50, 0.52, 0.47, 0.49]
    half = sp.t.ppf(0.975, 3) * sp.sem(values)
    bars = [c for c in axes[0].collections if c.get_segments()]
    spans = sorted(round(abs(seg[1][1] - seg[0][1]), 9) for c in bars for seg in c.get_segments())
    assert round(2 * half, 9) in spans
