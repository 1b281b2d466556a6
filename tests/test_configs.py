"""Every option of every config group composes, converts to typed settings and builds."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
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


# What each option must select, written out here (not read back from its file): the model's
# architecture family, the data format, the optimizer class, the hardware's accelerator, strategy
# and precision, the logger. A new option fails test_every_option_composes_into_settings until
# its line is added.
MODEL_TYPE = {
    # model=auto: no architecture in its file; it reads the tiny Llama directory _auto_model_dir
    # saves, takes its name from the directory and Llama's default targets (test_auto_model.py).
    "auto": ("local", "tiny-llama", ["q_proj", "v_proj"]),
    "bert-base": "bert", "falcon-7b": "falcon", "gpt2": "gpt2", "llama2-13b": "llama", "llama2-7b": "llama",
    "llama3-8b": "llama", "minilm-l6": "bert", "mistral-7b": "mistral", "roberta-base": "roberta",
    "smollm2-135m": "llama", "tiny-bert": "bert", "tiny-gpt2": "gpt2", "tiny-llama": "llama",
}
DATA_FORMAT = {"chat": "chat", "classification": "classification", "sharegpt": "sharegpt",
               "tasks": "instruction", "text": "text"}
OPTIMIZER_CLASS = {"adamw": "torch.optim.adamw.AdamW", "sgd": "torch.optim.sgd.SGD",
                   "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
                   "paged_adamw": "bitsandbytes.optim.adamw.PagedAdamW",
                   "paged_adamw8bit": "bitsandbytes.optim.adamw.PagedAdamW8bit"}
# (accelerator, strategy, precision, num_nodes)
HARDWARE = {"cpu": ("cpu", "auto", "32-true", 1), "gpu": ("gpu", "auto", "bf16-mixed", 1),
            "ddp": ("gpu", "ddp", "bf16-mixed", 1), "fsdp": ("gpu", "fsdp", "bf16-mixed", 1),
            "deepspeed": ("gpu", "deepspeed", "bf16-mixed", 1), "multinode": ("gpu", "ddp", "bf16-mixed", 2)}
# The loggers each option turns on, in order (logger=many is all three, as lightning-hydra-template's many_loggers).
LOGGERS = {"csv": ("csv",), "none": (), "tensorboard": ("tensorboard",), "wandb": ("wandb",),
           "many": ("csv", "tensorboard", "wandb")}


def selected(settings, group: str):
    """What the run's settings say was chosen for ``group``, in the terms of the tables above."""
    if group == "method":
        return settings.method["name"]
    if group == "model":
        m = settings.model
        return (m.source, m.name, m.target_modules) if m.arch == {} else m.arch["model_type"]
    if group == "data":
        return settings.data.format
    if group == "optimizer":
        opt = settings.optimizer.factory([torch.nn.Parameter(torch.zeros(2))])
        return f"{type(opt).__module__}.{type(opt).__qualname__}"
    if group == "hardware":
        hw = settings.hardware
        return hw.accelerator, hw.strategy, hw.precision, hw.num_nodes
    return settings.logger.names


EXPECTED = {"method": {o: o for o in options("method")}, "model": MODEL_TYPE, "data": DATA_FORMAT,
            "optimizer": OPTIMIZER_CLASS, "hardware": HARDWARE, "logger": LOGGERS}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_into_settings(group, option, tmp_path):
    assert option in EXPECTED[group], f"{group}={option}: add what it selects to the tables above"
    cfg = compose_with(*with_data(group, option))
    settings = settings_from_config(cfg, str(tmp_path))
    assert selected(settings, group) == EXPECTED[group][option]
    if group == "model" and option != "auto":
        assert settings.model.name == option


@pytest.mark.parametrize("option", options("optimizer"))
def test_every_optimizer_steps_with_the_settings_learning_rate(option, tmp_path):
    """One step from p = 1 with gradient 1 and weight decay 0.1 moves p to 1 - lr * (1 + 0.1):
    AdamW's first step is lr * m_hat / (sqrt(v_hat) + eps) = lr * g / (|g| + eps) plus its
    decoupled decay lr * wd * p; SGD's is lr * (g + wd * p) (its momentum buffer starts at the
    gradient). The rate is the default method's own (conf/method/lora.yaml), SGD's its own."""
    from omegaconf import OmegaConf

    lora_lr = float(OmegaConf.load(CONF / "method" / "lora.yaml")["lr"])
    lr = 1e-2 if option == "sgd" else lora_lr  # conf/optimizer/sgd.yaml keeps its own rate
    settings = settings_from_config(compose_with(f"optimizer={option}", "optimizer.weight_decay=0.1"),
                                    str(tmp_path))
    p = torch.nn.Parameter(torch.ones(2))
    opt = settings.optimizer.factory([{"params": [p], "lr": settings.optimizer.lr,
                                       "weight_decay": settings.optimizer.weight_decay}])
    p.grad = torch.ones(2)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((2,), 1 - lr * 1.1), rtol=0, atol=1e-6)


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
def test_every_method_a_run_builds_is_the_one_the_method_matrix_applies(method, tmp_path):
    """Applying each method to the tiny Llama (trainable count against its formula, frozen
    weights, a loss that halves, save and load, merge) is tests/methods/test_matrix.py, which
    builds each method from its conf/method file. Here: a composed run hands the method exactly
    those settings, and the method checks the tiny Llama's architecture without complaint."""
    from methods.tiny import method_kwargs

    settings = settings_from_config(compose_with(f"method={method}", "model=tiny-llama"), str(tmp_path))
    spec = dict(settings.method)
    assert spec.pop("name") == method
    spec.pop("lr", None)  # the optimizer's, not the method's
    assert spec == method_kwargs(method)
    built = method_from_spec(settings.method)
    assert built.name == method
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
