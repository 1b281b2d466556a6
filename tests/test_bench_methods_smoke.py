"""Smoke test of bench/methods.py: two methods on the tiny model, one child process each.

A correctness check of the script only; no timing is asserted (the machine is shared).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["method", "trainable params", "% of total", "base weight MB", "saved activations MB",
           "peak MB", "step s"]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def run_bench(out: Path, model: str, methods: str) -> subprocess.CompletedProcess:
    """bench/methods.py on a tiny batch (2 x 32 tokens, one timed step, one thread)."""
    cmd = [sys.executable, str(REPO / "bench" / "methods.py"), "--model", model,
           "--methods", methods, "--steps", "1", "--batch-size", "2", "--seq-len", "32",
           "--threads", "1", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_methods_bench_prints_a_row_per_method_and_writes_json(tmp_path):
    out = tmp_path / "methods.json"
    proc = run_bench(out, "tiny-llama", "lora,lora_fa")

    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert _cells(lines[0]) == COLUMNS
    rows = {cells[0]: cells for cells in map(_cells, lines[1:])}
    assert set(rows) == {"lora", "lora_fa"}

    data = json.loads(out.read_text())
    by = {r["method"]: r for r in data["rows"]}
    assert set(by) == {"lora", "lora_fa"} and data["model"] == "tiny-llama"
    # tiny-llama: hidden 64, 2 layers, q_proj 64 -> 64 and v_proj 64 -> 32 (2 kv heads of 16).
    # LoRA r=8 trains r * (in + out) per layer, LoRA-FA only B: r * out.
    assert by["lora"]["trainable_params"] == 2 * 8 * ((64 + 64) + (64 + 32))
    assert by["lora_fa"]["trainable_params"] == 2 * 8 * (64 + 32)
    for name, r in by.items():
        assert int(rows[name][1].replace(",", "")) == r["trainable_params"]
        assert float(rows[name][2]) == round(100 * r["trainable_params"] / r["total_params"], 3)
        assert r["step_s"] > 0 and len(r["step_times_s"]) == 1
        # Both keep the same fp32 base; the peak holds at least the weights and the activations.
        assert r["base_weight_mb"] == by["lora"]["base_weight_mb"] > 0
        assert r["peak_mb"] > r["base_weight_mb"] + r["saved_activations_mb"] > 0
    # Frozen A: LoRA-FA keeps the r-wide A x instead of x (and LoRA's dropout mask) for backward.
    assert by["lora_fa"]["saved_activations_mb"] < by["lora"]["saved_activations_mb"]
    checks = {c["check"]: c["result"] for c in data["checks"]}
    assert checks["LoRA-FA saves fewer activations than LoRA"] == "PASS"
    assert "- PASS: LoRA-FA saves fewer activations than LoRA: lora_fa" in proc.stdout
    assert checks["QLoRA base weights < 1/3 of the fp32 base"] == "SKIPPED"


def test_methods_bench_runs_several_models_side_by_side(tmp_path):
    """--model a,b,c: one table with a model column; a classifier (tiny-bert) is timed on a
    labelled batch; trainable counts follow each architecture's default targets."""
    out = tmp_path / "zoo.json"
    proc = run_bench(out, "tiny-llama,tiny-gpt2,tiny-bert", "lora")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert _cells(lines[0]) == ["model", *COLUMNS]
    assert [c[0] for c in map(_cells, lines[1:])] == ["tiny-llama", "tiny-gpt2", "tiny-bert"]
    by = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    assert by["tiny-llama"]["trainable_params"] == 2 * 8 * ((64 + 64) + (64 + 32))
    # GPT-2: the fused c_attn (64 -> 192) per layer; BERT: query and value (64 -> 64) per layer
    # plus the new classification head (64 x 2 + 2), which trains with every method.
    assert by["tiny-gpt2"]["trainable_params"] == 2 * 8 * (64 + 192)
    assert by["tiny-bert"]["trainable_params"] == 2 * 2 * 8 * (64 + 64) + (64 * 2 + 2)
    assert all(r["step_s"] > 0 and r["peak_mb"] > 0 for r in by.values())
