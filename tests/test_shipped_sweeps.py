"""The sweeps shipped in sweeps/, run the way README shows (``python -m ftlab sweep=NAME``,
overrides typed after it win over the file), shrunk from the command line to the tiny model,
2 steps and a few jobs, and the report ``python -m ftlab.report DIR`` writes for each.

- ranks: ``method=lora method.r=2`` typed, so the file's alpha axis (8, 16, 32) is the grid;
- precision: ``model.quantization=none,nf4`` typed, so the file's precision axis (32-true,
  bf16-mixed; bf16 autocast runs on the CPU too) crosses two bases;
- lr_search: the Optuna search with ``hydra.sweeper.n_trials=2`` and ``objective=val_perplexity``.

Every axis of every shipped sweep can be shrunk this way (a typed key replaces the file's
values for that key); the file's ``trainer.max_steps`` is replaced the same way."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

SMALL = ["model=tiny-llama", "trainer.max_steps=2", "trainer.val_check_interval=2", "data.batch_size=4",
         "eval.max_examples=2", "eval.max_new_tokens=4", "logger=none", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shipped")
    commands = {
        "ranks": ["sweep=ranks", *SMALL, "method=lora", "method.r=2"],
        "precision": ["sweep=precision", *SMALL, "model.quantization=none,nf4", "eval.generate=false"],
        "lr_search": ["sweep=lr_search", *SMALL, "hydra.sweeper.n_trials=2", "objective=val_perplexity",
                      "eval.generate=false"],
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(commands, pool.map(
            lambda item: run_cli(*item[1], f"hydra.sweep.dir={root / item[0]}", env={"OMP_NUM_THREADS": "1"}),
            commands.items())))
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    return {name: root / name for name in commands}


def _jobs(sweep: Path) -> dict[str, tuple[dict, dict]]:
    """job directory name -> (metrics.json, config.yaml)"""
    return {p.parent.name: (json.loads(p.read_text()), yaml.safe_load((p.parent / "config.yaml").read_text()))
            for p in sorted(sweep.glob("*/metrics.json"))}


def _report(sweep: Path, capsys) -> list[str]:
    """``python -m ftlab.report SWEEP`` (its main, in this process): the rows of report.md,
    which must be what it printed."""
    from ftlab.report import main

    main([str(sweep)])
    printed = capsys.readouterr().out
    report = (sweep / "report.md").read_text()
    assert report.strip() in printed
    for name in ("jobs.csv", "report.csv", "val_loss_curves.png", "pareto.png"):
        assert (sweep / name).is_file(), name
    return [line for line in report.splitlines() if line.startswith("| ")]  # header, rows (no |---|)


def _row(header: str, line: str) -> dict[str, str]:
    cells = lambda s: [c.strip() for c in s.strip().strip("|").split("|")]  # noqa: E731
    return dict(zip(cells(header), cells(line)))


def test_ranks_sweep_runs_the_files_alpha_axis(sweeps, capsys):
    jobs = _jobs(sweeps["ranks"])
    assert sorted(c["method"]["alpha"] for _, c in jobs.values()) == [8, 16, 32]  # sweeps/ranks.yaml
    for m, c in jobs.values():
        assert m["status"] == "completed" and m["steps"] == 2 and c["sweep_name"] == "ranks"
        assert (c["method"]["name"], c["method"]["r"]) == ("lora", 2)
        # LoRA r=2 on q_proj (64 -> 64) and v_proj (64 -> 32: 2 kv heads of 16), 2 layers
        assert m["trainable_params"] == 2 * 2 * ((64 + 64) + (64 + 32))
    header, *rows = _report(sweeps["ranks"], capsys)
    table = {_row(header, r)["job"]: _row(header, r) for r in rows}
    assert set(table) == set(jobs)
    for job, (m, _) in jobs.items():
        assert table[job]["alpha"] == str(m["alpha"]) and table[job]["status"] == "completed"
        assert float(table[job]["val_loss"]) == pytest.approx(m["val_loss"], abs=5e-5)


def test_precision_sweep_crosses_the_files_precisions_with_the_typed_bases(sweeps, capsys):
    jobs = _jobs(sweeps["precision"])
    got = sorted((m["precision"], m["quantization"]) for m, _ in jobs.values())
    assert got == sorted((p, q) for p in ("32-true", "bf16-mixed") for q in ("none", "nf4"))
    assert all(m["status"] == "completed" for m, _ in jobs.values())
    header, *rows = _report(sweeps["precision"], capsys)
    table = {_row(header, r)["job"]: _row(header, r) for r in rows}
    assert set(table) == set(jobs)
    for job, (m, _) in jobs.items():
        assert (table[job]["precision"], table[job]["quantization"]) == (m["precision"], m["quantization"])


def test_lr_search_returns_the_chosen_objective_to_optuna(sweeps, capsys):
    """objective=val_perplexity: the best value Optuna reports is the lowest val_perplexity of
    the trials (not their val_loss), at that trial's learning rate, inside the file's interval."""
    sweep = sweeps["lr_search"]
    jobs = _jobs(sweep)
    assert len(jobs) == 2
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    winner = min(jobs.values(), key=lambda mc: mc[0]["val_perplexity"])[0]
    assert best["best_value"] == pytest.approx(winner["val_perplexity"])
    assert best["best_value"] != pytest.approx(min(m["val_loss"] for m, _ in jobs.values()))
    assert best["best_params"]["optimizer.lr"] == pytest.approx(winner["lr"])
    for m, _ in jobs.values():
        assert 1e-5 <= m["lr"] <= 1e-2  # sweeps/lr_search.yaml: tag(log, interval(1e-5, 1e-2))
        assert m["val_perplexity"] == pytest.approx(math.exp(m["val_loss"]), rel=1e-4)
    header, *rows = _report(sweep, capsys)
    assert len(rows) == 2
    shown = sorted(float(_row(header, r)["lr"]) for r in rows)
    assert shown == pytest.approx(sorted(m["lr"] for m, _ in jobs.values()), rel=1e-3)
