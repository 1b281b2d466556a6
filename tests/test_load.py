"""Load: a sweep of tiny-model jobs through Hydra's joblib launcher, two worker processes at a
time, all on one empty shared cache. Every job completes with its metrics.json, the shared
caches hold whole entries only (the tokenised data built once, under its lock; no scratch
directories left), and the report covers every job.

Default: 4 jobs. ``-m stress``: 50 jobs (docs/robustness.md has the figures).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftlab import report
from tiny_runs import ENV, REPO

JOB = ["model=tiny-llama", "logger=none", "data.batch_size=8", "eval.max_examples=2", "eval.max_new_tokens=4",
       "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
       "checkpoint.every_n_steps=100"]


def sweep(tmp_path: Path, jobs: int) -> tuple[Path, Path, float]:
    sweep_dir, cache = tmp_path / "sweep", tmp_path / "cache"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ftlab", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                           *JOB, f"seed=range(1,{jobs + 1})", f"hydra.sweep.dir={sweep_dir}"],
                          cwd=REPO, env={**ENV, "FTLAB_CACHE": str(cache)}, capture_output=True, text=True,
                          timeout=3600)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return sweep_dir, cache, elapsed


def check_sweep(sweep_dir: Path, cache: Path, jobs: int, capsys) -> None:
    from ftlab.data import cache as data_cache

    metrics = sorted(sweep_dir.glob("*/metrics.json"))
    assert len(metrics) == jobs
    for path in metrics:
        m = json.loads(path.read_text())
        assert m["status"] == "completed" and m["steps"] == 2, (path, m.get("error"))
    assert sorted(json.loads(p.read_text())["seed"] for p in metrics) == list(range(1, jobs + 1))

    # One tokenised-data entry, whole; evaluation scores whole; nothing half-written left.
    entries = [p for p in (cache / "data").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and data_cache.load(entries[0].name) is not None
    for scores in (cache / "evals").glob("*.json"):
        assert "scores" in json.loads(scores.read_text())
    assert not [p for p in cache.rglob("*") if "-tmp-" in p.name or "-old-" in p.name or ".tmp-" in p.name]

    capsys.readouterr()
    report.main([str(sweep_dir)])
    with (sweep_dir / "jobs.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == jobs and {r["status"] for r in rows} == {"completed"}


def test_four_jobs_through_the_joblib_launcher(tmp_path, capsys):
    sweep_dir, cache, _ = sweep(tmp_path, 4)
    check_sweep(sweep_dir, cache, 4, capsys)


@pytest.mark.stress
def test_fifty_jobs_through_the_joblib_launcher(tmp_path, capsys):
    sweep_dir, cache, elapsed = sweep(tmp_path, 50)
    check_sweep(sweep_dir, cache, 50, capsys)
    with capsys.disabled():
        print(f"\n50 jobs, 2 workers: {elapsed:.0f} s wall (load average {os.getloadavg()[0]:.1f})")
