"""The ``ftlab`` console script: subcommands, the list of them, unknown ones, and the
``[project.scripts]`` entry that installs it."""

from __future__ import annotations

import json
import tomllib

import pytest
from conftest import REPO, assert_usage_error, run_cli

from ftlab import commands


@pytest.fixture
def calls(monkeypatch):
    """Each command's entry point replaced by a recorder: ``[(module, argv), ...]``."""
    import ftlab.cli
    import ftlab.eval
    import ftlab.export
    import ftlab.report

    seen = []
    for module in (ftlab.cli, ftlab.eval, ftlab.export, ftlab.report):
        monkeypatch.setattr(module, "main", lambda argv=None, m=module.__name__: seen.append((m, argv)))
    return seen


def test_the_console_script_is_the_dispatcher():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"ftlab": "ftlab.commands:main"}


def test_ftlab_alone_and_help_list_every_command_in_one_line_each(capsys, calls):
    for argv in ([], ["--help"], ["-h"]):
        commands.main(argv)
        out = capsys.readouterr().out
        for name in ("train", "plan", "eval", "export", "report"):
            assert any(line.split()[:1] == [name] and len(line.split()) > 3 for line in out.splitlines()), out
    assert calls == []  # nothing ran


@pytest.mark.parametrize("argv,expected", [
    (["train", "method=vera", "-m"], ("ftlab.cli", ["method=vera", "-m"])),
    (["plan", "model=llama2-7b"], ("ftlab.cli", ["model=llama2-7b", "dry_run.enabled=true"])),
    (["eval", "runs/x", "--best"], ("ftlab.eval", ["runs/x", "--best"])),
    (["export", "runs/x", "--adapter", "out"], ("ftlab.export", ["runs/x", "--adapter", "out"])),
    (["report", "multirun/x", "--baseline", "dora"], ("ftlab.report", ["multirun/x", "--baseline", "dora"])),
    (["train", "--help"], ("ftlab.cli", ["--help"])),
    # No command, but overrides or Hydra options: train, as `python -m ftlab ...` always did.
    (["method=vera", "method.r=4"], ("ftlab.cli", ["method=vera", "method.r=4"])),
    (["-m", "method.r=4,8"], ("ftlab.cli", ["-m", "method.r=4,8"])),
    (["resume=last"], ("ftlab.cli", ["resume=last"])),
])
def test_each_command_reaches_its_entry_point(argv, expected, calls):
    commands.main(argv)
    assert calls == [expected]


def test_python_m_ftlab_alone_still_runs_the_default_job(calls, monkeypatch):
    monkeypatch.setattr("sys.argv", ["ftlab"])
    commands.module_main()
    assert calls == [("ftlab.cli", [])]
    monkeypatch.setattr("sys.argv", ["ftlab", "--help"])  # Hydra's help (config groups), as before
    commands.module_main()
    assert calls[-1] == ("ftlab.cli", ["--help"])


@pytest.mark.parametrize("word,hint", [("trian", "did you mean 'train'"), ("evaluate", "did you mean 'eval'"),
                                       ("runs/x", "commands: train, plan, eval, export, report")])
def test_an_unknown_command_is_a_usage_error_with_a_hint(word, hint, capsys, calls):
    with pytest.raises(SystemExit) as exc:
        commands.main([word, "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftlab: error: unknown command") and hint in err[0], err
    assert calls == []


def test_plan_writes_a_plan_without_weights(tmp_path):
    """``ftlab plan`` end to end in this process: the dry run's plan.json, no weights read."""
    commands.main(["plan", "model=tiny-llama", "method=vera", "logger=none", f"hydra.run.dir={tmp_path / 'p'}"])
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["method"] == "vera" and plan["trainable_params"] > 0


def test_python_m_ftlab_dispatches_subcommands_too(tmp_path):
    """Today's failure (``cannot parse the overrides``) is gone: the subcommand reaches eval,
    which refuses a directory that is no run in one line."""
    proc = run_cli("eval", str(tmp_path / "no-run"))
    assert_usage_error(proc)
    assert "cannot parse the overrides" not in proc.stderr


def test_ci_installs_exactly_as_the_readme_says():
    """.ci/run follows README's set-up block: each of its commands, line for line."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Set up and run the tests", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    steps = [line for line in block.splitlines() if line.startswith(("pip ", "ruff ", "HF_HUB_OFFLINE"))]
    assert len(steps) == 5, block
    for step in steps:
        assert any(line.split("#")[0].strip() == step for line in ci), step
