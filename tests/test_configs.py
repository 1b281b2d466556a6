"""Every option of every config group composes, converts to typed settings and builds."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ftlab.settings import config_dir, settings_from_config
from ftlab.methods import method_from_spec
from ftlab.models import meta_model

CONF = config_dir()
GROUPS = ["method", "model", "data", "optimizer", "hardware", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def encoder_only(model: str) -> bool:
    """A model with no language-model head (BERT, RoBERTa, MiniLM): it trains on classification data."""
    from omegaconf import OmegaConf

    return "causal_lm" not in OmegaConf.load(CONF / "model" / f"{model}.yaml").get("tasks", ["causal_lm"])


def with_data(group: str, option: str) -> list[str]:
    extra = ["data=classification"] if group == "model" and encoder_only(option) else []
    if group == "model" and option == "auto":  # model=auto reads a model directory's config.json
        extra.append(f"model.path={_auto_model_dir()}")
    return [f"{group}={option}", *extra]


@functools.lru_cache(maxsize=None)
def _auto_model_dir() -> Path:
    from hf_dirs import save_tiny_model

    root = Path(tempfile.mkdtemp(prefix="ftlab-auto-model-"))
    atexit.register(shutil.rmtree, root, True)
    return save_tiny_model(root / "tiny-llama")


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_into_settings(group, option, tmp_path):
    cfg = compose_with(*with_data(group, option))
    settings = settings_from_config(cfg, str(tmp_path))
    assert getattr(settings, group) if group != "method" else settings.method["name"] == option
    # The optimizer builds over a real parameter.
    import torch

    opt = settings.optimizer.factory([{"params": [torch.nn.Parameter(torch.zeros(2))],
                                       "lr": settings.optimizer.lr}])
    assert opt.param_groups[0]["lr"] == settings.optimizer.lr


@pytest.mark.parametrize("model", options("model"))
def test_every_model_builds_on_the_meta_device(model, tmp_path):
    """The architecture alone (no weights, no hub) builds with every head it declares
    (exact sizes: tests/test_models.py)."""
    settings = settings_from_config(compose_with(*with_data("model", model)), str(tmp_path))
    for task in settings.model.tasks:
        m = meta_model(dataclasses.replace(settings.model, task=task))
        assert next(m.parameters()).device.type == "meta"
        assert type(m).__name__.endswith("ForCausalLM" if task == "causal_lm" else "ForSequenceClassification") \
            or (task == "causal_lm" and type(m).__name__.endswith("LMHeadModel"))


@pytest.mark.parametrize("method", options("method"))
def test_every_method_builds_and_applies_to_tiny_llama(method, tmp_path):
    settings = settings_from_config(compose_with(f"method={method}", "model=tiny-llama"), str(tmp_path))
    built = method_from_spec(settings.method)  # as a run builds it (method.lr is the optimizer's)
    built.check(meta_model(settings.model))


@pytest.mark.parametrize("method", options("method"))
def test_each_method_brings_its_learning_rate_unless_optimizer_lr_is_set(method, tmp_path):
    from omegaconf import OmegaConf

    own = float(OmegaConf.load(CONF / "method" / f"{method}.yaml")["lr"])
    assert 1e-6 <= own <= 1e-1

    def lr(*overrides: str) -> float:
        return settings_from_config(compose_with(f"method={method}", *overrides), str(tmp_path)).optimizer.lr

    assert lr() == own
    assert lr("optimizer=adamw8bit") == own
    assert lr("optimizer.lr=2e-3") == 2e-3
    assert lr("lr_scale=3") == pytest.approx(3 * own)
    assert lr("optimizer.lr=2e-3", "lr_scale=0.5") == pytest.approx(1e-3)
    assert lr("optimizer=sgd") == 1e-2  # SGD keeps its own rate (Adam-scale rates do not suit it)


def test_a_method_config_without_lr_falls_back_and_lr_scale_is_checked(tmp_path):
    from ftlab.errors import ConfigError

    cfg = compose_with("method=lora", "~method.lr")
    assert settings_from_config(cfg, str(tmp_path)).optimizer.lr == 1e-3  # conf/optimizer/adamw.yaml
    with pytest.raises(ConfigError, match="lr_scale must be a positive number"):
        settings_from_config(compose_with("lr_scale=0"), str(tmp_path))


def test_help_lists_every_group_option():
    from conftest import run_cli

    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for group in GROUPS:
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f"{group}:"))
        assert set(o.strip() for o in line.split(":", 1)[1].split(",")) == set(options(group))
