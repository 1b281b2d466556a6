"""The report of a directory of dry runs, as docs/scale.md shows it:

    python -m ftlab -m model=llama2-7b hardware=gpu method=full,lora,qlora dry_run=true hydra.sweep.dir=plans
    python -m ftlab.report plans     # a markdown table of every plan.json in it

The plans are written here the way a dry-run job writes them (``plan_run`` + ``write_plan``, one
job directory each; tests/test_plan.py runs the dry-run CLI itself); the report command's main
reads the directory, prints the table and writes it to ``plans.md``."""

from __future__ import annotations

import json

from ftlab.planning.planner import GIB, plan_run, write_plan
from ftlab.report import main as report_main
from ftlab.settings import config_dir, settings_from_config


def _settings(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["dry_run.enabled=true", "model=tiny-llama", *overrides],
                      return_hydra_config=True)
    return settings_from_config(cfg, "/tmp/ftlab-plan-unused")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_report_of_a_directory_of_plans(tmp_path, capsys):
    plans = tmp_path / "plans"
    for job, method in (("0_full", "full"), ("1_lora", "lora")):
        (plans / job).mkdir(parents=True)
        write_plan(plan_run(_settings(f"method={method}", "dry_run.device_memory_gb=1")), plans / job)
    saved = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in plans.glob("*/plan.json")}

    report_main([str(plans)])
    printed = capsys.readouterr().out
    table = (plans / "plans.md").read_text().strip()
    assert table in printed
    header, _, *rows = [line for line in table.splitlines() if line.startswith("|")]
    columns = _cells(header)
    by_method = {r[0]: dict(zip(columns, r)) for r in map(_cells, rows)}
    assert set(by_method) == {"full", "lora"}
    # LoRA r=8 on q_proj (64 -> 64) and v_proj (64 -> 32), 2 layers: 8 * (128 + 96) * 2
    assert by_method["lora"]["trainable params"] == f"{8 * (128 + 96) * 2:,}"
    assert by_method["full"]["trainable params"] == f"{saved['full']['total_params']:,}"
    assert by_method["full"]["% of total"] == "100.000"
    for method, row in by_method.items():
        memory = saved[method]["memory"]
        assert row["precision"] == saved[method]["precision"] and row["base"] == "none"
        assert float(row["**peak**"]) == round(memory["without_checkpointing"]["peak"] / GIB, 1)
        assert float(row["**peak, grad. ckpt**"]) == round(memory["with_checkpointing"]["peak"] / GIB, 1)
    assert not (plans / "report.csv").exists()  # a plan directory is no sweep of results
