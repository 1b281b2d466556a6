"""Shared test helpers: offline environment, running the real CLI, tiny settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small, fast settings for CLI runs on the tiny random model.
TINY = ["model=tiny-llama", "trainer.max_steps=3", "trainer.val_check_interval=2",
        "eval.max_examples=4", "data.batch_size=4", "logger=none"]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            module: str = "ftlab", timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m ftlab ARGS`` in a subprocess, as a user would type it."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit status 2, one line on stderr starting with ``ftlab: error:``, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ftlab: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def pytest_collection_modifyitems(config, items):
    """Tests marked ``stress`` (minutes each) run only when ``-m`` names them (``-m stress``)."""
    if "stress" in (config.getoption("markexpr") or ""):
        return
    kept = [item for item in items if "stress" not in item.keywords]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if "stress" in item.keywords])
        items[:] = kept


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)
