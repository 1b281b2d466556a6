"""What a run leaves besides its model: ``train.log`` (per job of a sweep too), several loggers
at once, and what W&B receives (read back from the offline run's own file)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tiny_runs import FAST, wandb_records

from ftlab import cli

TINY = [a for a in FAST if a != "logger=none"] + ["trainer.max_steps=2", "eval.generate=false"]


def _cli(monkeypatch, *args: str) -> None:
    """``python -m ftlab ARGS`` in this process (Hydra included)."""
    monkeypatch.setattr(sys, "argv", ["ftlab"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli.main(list(args))


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    import wandb

    wandb.finish()  # a W&B run an earlier test in this process left open would take this run's records
    run_dir = tmp_path_factory.mktemp("many") / "run"
    with pytest.MonkeyPatch.context() as mp:
        _cli(mp, *TINY, "logger=many", "+callbacks.w._target_=tiny_runs.WarnOnFit", f"hydra.run.dir={run_dir}")
    return run_dir


def test_train_log_holds_what_the_run_printed(many):
    log = (many / "train.log").read_text()
    assert "Parameters (lora): trainable" in log and "q_proj.lora_A" in log  # the parameter table
    assert "Data 'tasks'" in log                                              # the data summary
    assert "Result on the held-out split:" in log and "val_loss" in log       # the results
    assert "UserWarning: a warning from the tiny run" in log                  # a warning
    assert "━" not in log.split("Result on the held-out split:")[1]           # no progress bars after
    assert not (many / "cli.log").exists()  # Hydra's (empty) job log is not written


def test_several_loggers_write_side_by_side(many):
    assert (many / "logs" / "metrics.csv").read_text().count("\n") > 1
    assert list((many / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((many / "metrics.json").read_text())
    assert metrics["wandb"]["mode"] == "offline" and metrics["wandb"]["group"] == "lora"


def test_wandb_gets_best_value_summaries_and_flat_config_columns(many):
    records = wandb_records(many)
    summaries = {r.metric.name: (r.metric.step_metric, r.metric.summary) for r in records
                 if r.WhichOneof("record_type") == "metric" and r.metric.name}
    assert summaries["val/loss"][0] == "trainer/global_step" and summaries["val/loss"][1].min
    assert summaries["val/token_accuracy"][1].max and summaries["val/accuracy"][1].max
    config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for u in r.config.update}
    assert {k: config[k] for k in ("method", "r", "alpha", "precision", "seed")} == {
        "method": "lora", "r": 8, "alpha": 16, "precision": "32-true", "seed": 42}
    assert config["lr"] > 0 and config["model"] == "tiny-llama"
    assert config["method/target_modules"] == ["q_proj", "v_proj"] and "optimizer/weight_decay" in config
    assert not any(isinstance(v, dict) for v in config.values() if v != {})


def test_each_job_of_a_sweep_has_its_own_train_log(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    _cli(monkeypatch, "-m", *TINY, "logger=[csv,tensorboard]", "method.r=2,4", "eval.before=false",
         f"hydra.sweep.dir={sweep}")
    logs = sorted(sweep.glob("*/train.log"))
    assert len(logs) == 2
    for log in logs:
        text = log.read_text()
        assert text.count("Parameters (lora): trainable") == 1 and "Result on the held-out split:" in text
        assert (log.parent / "tensorboard").is_dir() and (log.parent / "logs" / "metrics.csv").is_file()
    first, second = (json.loads((p.parent / "metrics.json").read_text())["trainable_params"] for p in logs)
    assert f"trainable {first:,} " in logs[0].read_text() and f"trainable {second:,} " in logs[1].read_text()


def test_a_failed_run_leaves_its_error_in_train_log(tmp_path, monkeypatch):
    run_dir = tmp_path / "failed"
    with pytest.raises((SystemExit, RuntimeError)):
        _cli(monkeypatch, *TINY, "logger=none", "eval.before=false", "+callbacks.w._target_=tiny_runs.WarnOnFit",
             "+callbacks.w.fail=true", f"hydra.run.dir={run_dir}")
    log = (run_dir / "train.log").read_text()
    assert "Traceback" in log and "RuntimeError: an error from the tiny run" in log


# ------------------------------------------------------------- settings, and the report on W&B
def test_logger_choices_become_settings():
    from tiny_runs import compose

    from ftlab.errors import ConfigError
    from ftlab.settings import logger_settings, settings_from_config

    for overrides, names in ((["logger=[csv,tensorboard]"], ("csv", "tensorboard")), (["logger=none"], ()),
                             (["logger=many"], ("csv", "tensorboard", "wandb")), ([], ("csv",))):
        s = settings_from_config(compose("model=tiny-llama", *overrides), "/tmp/x").logger
        assert s.names == names, overrides
    s = settings_from_config(compose("model=tiny-llama", "logger=[wandb]", "logger.wandb.project=p"), "/tmp/x")
    assert s.logger.names == ("wandb",) and s.logger.project == "p"
    old = logger_settings({"name": "wandb", "project": "q", "tags": []})  # a run saved before
    assert old.names == ("wandb",) and old.project == "q"
    assert logger_settings({"name": "none"}).names == ()
    with pytest.raises(ConfigError, match="unknown logger 'tensorbord' .did you mean 'tensorboard'"):
        logger_settings({"tensorbord": {}})


class FakeWandb:
    """Records what ``ftlab report --wandb`` hands W&B."""

    def __init__(self):
        self.init_kwargs, self.logged, self.summary, self.finished = None, {}, {}, False
        self.Table = lambda columns, data: ("table", columns, data)
        self.Image = lambda path: ("image", Path(path).name)

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, payload):
        self.logged.update(payload)

    def finish(self):
        self.finished = True

    dir, path = "/nowhere/files", "me/ftlab/abc123"


def test_report_logs_tables_and_plots_to_the_sweeps_wandb_group(tmp_path, monkeypatch, capsys):
    from ftlab import commands

    where = {"project": "ftlab", "entity": "lab", "group": "methods", "run_id": "x", "mode": "online"}
    for num, (method, loss) in enumerate((("lora", 0.5), ("vera", 0.7))):
        job = tmp_path / f"{num}_{method}"
        job.mkdir()
        (job / "metrics.json").write_text(json.dumps({
            "status": "completed", "method": method, "seed": 42, "lr": 1e-3, "val_loss": loss,
            "trainable_params": 100 * (num + 1), "wall_time_s": 5.0, "peak_memory_mb": 300.0,
            "val_history": [{"step": 0, "val_loss": 5.0}, {"step": 2, "val_loss": loss}],
            "overrides": [f"method={method}"], "wandb": {**where, "run_id": f"r{num}"}}))
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    commands.main(["report", str(tmp_path), "--wandb"])
    assert fake.init_kwargs["group"] == "methods" and fake.init_kwargs["project"] == "ftlab"
    assert fake.init_kwargs["entity"] == "lab" and fake.init_kwargs["job_type"] == "report"
    kind, columns, data = fake.logged["report/jobs"]
    assert kind == "table" and "val_loss" in columns and len(data) == 2
    assert fake.logged["report/pareto"] == ("image", "pareto.png")
    assert fake.logged["report/val_loss_curves"] == ("image", "val_loss_curves.png")
    assert "report/report" in fake.logged and fake.finished and "| lora |" in fake.summary["report_md"]
    assert "logged the report to W&B group 'methods'" in capsys.readouterr().out


def test_report_wandb_refuses_jobs_that_never_logged_to_wandb(tmp_path, capsys):
    from ftlab import report

    (tmp_path / "0_lora").mkdir()
    (tmp_path / "0_lora" / "metrics.json").write_text(json.dumps({"status": "completed", "method": "lora",
                                                                  "val_loss": 0.5}))
    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path), "--wandb"])
    assert exc.value.code == 2 and "no job under" in capsys.readouterr().err
    assert not (tmp_path / "report.csv").exists()  # refused before any work


@pytest.mark.parametrize("choice,needle", [
    ("logger=[csv,tensorbord]", "unknown logger 'tensorbord' (did you mean 'tensorboard'?)"),
    ("logger.wandb.projekt=x", "did you mean 'logger.wandb.project'"),
])
def test_a_bad_logger_choice_is_one_line_and_status_2(choice, needle, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        _cli(monkeypatch, "model=tiny-llama", "logger=many", choice, f"hydra.run.dir={tmp_path / 'run'}")
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("ftlab: error:") and needle in err[0], err
    assert not (tmp_path / "run").exists()
