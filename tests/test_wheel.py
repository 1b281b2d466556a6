"""ftlab works from an installed wheel, not only from a checkout (configs ship inside it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    # No build isolation: the backend (hatchling, in the dev extra) comes from this environment,
    # not from the package index, so the test needs no network.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(root / "dist"), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next((root / "dist").glob("ftlab-*.whl"))
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    return root, target


def _run(target, cwd, *args):
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "ftlab", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_installed_wheel_lists_groups_and_runs(installed, tmp_path):
    root, target = installed
    proc = _run(target, tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "method: " in proc.stdout and "tiny-llama" in proc.stdout
    run_dir = tmp_path / "run"
    proc = _run(target, tmp_path, "model=tiny-llama", "trainer.max_steps=2", "eval.max_examples=2",
                "logger=none", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    code = "import ftlab, ftlab.settings; print(ftlab.__file__); print(ftlab.settings.config_dir())"
    probe = subprocess.run([sys.executable, "-c", code],
                           env={**os.environ, "PYTHONPATH": str(target)}, cwd=tmp_path,
                           capture_output=True, text=True)
    assert str(target) in probe.stdout.splitlines()[0]
    assert str(target) in probe.stdout.splitlines()[1]
