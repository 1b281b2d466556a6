"""Smoke test of bench/peers.py ``--quick``: the tiny model, one step per way, one process.

A correctness check of the script (it runs the ways, counts tokens and prints ratios to HF
Trainer's dynamic padding); no timing is asserted. The TRL ways need the ``bench`` extra and
are skipped without it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _rows(ways: str) -> dict[str, list[str]]:
    cmd = [sys.executable, str(REPO / "bench" / "peers.py"), "--quick", "--lengths", "short", "--ways", ways]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in proc.stdout.splitlines()
             if line.startswith("| short |")]
    return {c[1]: c[2:] for c in cells}


def _check(row: list[str], base: list[str]) -> None:
    tok, step, timed, eff = float(row[0].replace(",", "")), float(row[1]), int(row[2]), row[3]
    assert tok > 0 and step > 0 and timed == 1 and eff.endswith("%")
    ratio = float(row[5].rstrip("x"))  # one round: the ratio of the two rows' rates
    assert math.isclose(ratio, tok / float(base[0].replace(",", "")), rel_tol=0.02)


def test_ftlab_ways_run_and_are_compared_with_hf_dynamic_padding():
    rows = _rows("hf-dynamic,ftlab,ftlab-pack")
    base = rows["HF Trainer + peft, dynamic padding"]
    assert base[5] == "1.00x"
    _check(rows["ftlab default"], base)
    _check(rows["ftlab, packing"], base)
    # Packing fills rows with several examples: less padding than one example per row (only the
    # last, partly filled pack of the few --quick records pads).
    assert float(rows["ftlab, packing"][3].rstrip("%")) > float(rows["ftlab default"][3].rstrip("%"))


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL: bench-only extra (.[bench])")
def test_trl_ways_run():
    rows = _rows("hf-dynamic,trl,trl-pack")
    base = rows["HF Trainer + peft, dynamic padding"]
    _check(rows["TRL SFTTrainer"], base)
    _check(rows["TRL SFTTrainer, packing"], base)
