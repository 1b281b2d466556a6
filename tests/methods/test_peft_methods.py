"""The peft-backed methods one by one: ranges, checks on the meta model, and what makes each
method itself (LoRA+'s learning rates, AdaLoRA's rank allocation and penalty, QLoRA's NF4 base,
PiSSA's SVD start, VeRA's shared projections, (IA)^3's targets, the prompt family)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from ftlab.config import ModelSettings, OptimizerSettings, SchedulerSettings
from ftlab.data.collate import Collator
from ftlab.errors import ConfigError
from ftlab.methods import build_method, count_parameters
from ftlab.methods.quantized import check_quantized_base
from ftlab.models import load_model, meta_model
from ftlab.models.loading import check_quantization
from ftlab.training.module import FinetuneModule

from .tiny import ARCH, BAD_CONTEXT, BAD_VALUES, build, method_kwargs, tiny_settings

PEFT_METHODS = ["dora", "pissa", "lora_plus", "vera", "qlora", "adalora", "ia3", "loha", "lokr",
                "prompt_tuning", "p_tuning", "prefix_tuning"]
WITH_TARGETS = ["dora", "pissa", "lora_plus", "vera", "qlora", "adalora", "loha", "lokr"]
PROMPT_METHODS = ["prompt_tuning", "p_tuning", "prefix_tuning"]


def test_every_builder_default_is_its_config_value():
    """``build_method(name)`` from Python builds what ``method=name`` builds from its config
    (prefix tuning's projection was False in Python, true in the config)."""
    import inspect

    from omegaconf import OmegaConf

    from ftlab.methods.registry import _BUILDERS

    from .tiny import CONF

    build_method("lora")  # loads the registry
    checked = 0
    for name, builder in _BUILDERS.items():
        config = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
        defaults = inspect.signature(builder).parameters
        for key, value in config.items():
            if key in ("name", "lr") or (isinstance(value, str) and "${" in value):
                continue  # interpolations (the model's target_modules) have no Python counterpart
            default = defaults[key].default
            assert (list(default) if isinstance(default, tuple) else default) == value, (name, key)
            checked += 1
    assert checked > 40


# ----------------------------------------------------------------------------- ranges
@pytest.mark.parametrize("name,key,value", BAD_VALUES, ids=[f"{n}.{k}={v}" for n, k, v in BAD_VALUES])
def test_out_of_range_values_name_their_key(name, key, value):
    context = {k: yaml.safe_load(v) for k, v in BAD_CONTEXT.get((name, key), {}).items()}
    with pytest.raises(ConfigError, match=rf"method\.{key}\b"):
        build(name, **context, **{key: yaml.safe_load(value)})


def test_every_peft_method_builds_from_its_config():
    for name in PEFT_METHODS:
        assert build(name).name == name


# ----------------------------------------------------------------------------- check on meta
@pytest.mark.parametrize("name", PEFT_METHODS)
def test_check_on_the_meta_model_injects_nothing(name):
    model = meta_model(tiny_settings())
    build(name).check(model)  # PiSSA's SVD and peft's injection would fail or mutate here
    assert not any("lora_" in n or "prompt_encoder" in n for n, _ in model.named_parameters())
    assert next(model.parameters()).device.type == "meta"


@pytest.mark.parametrize("name", PEFT_METHODS)
def test_applying_on_the_meta_device_counts_what_a_run_trains(name, tiny_model):
    """Dry runs and bench/method_param_counts.py apply methods to meta-device models."""
    on_meta, _ = count_parameters(build(name).apply(meta_model(tiny_settings()), 10))
    real, _ = count_parameters(build(name).apply(tiny_model(), 10))
    assert on_meta == real


@pytest.mark.parametrize("name", WITH_TARGETS)
def test_a_target_that_matches_nothing_is_named(name):
    with pytest.raises(ConfigError, match=r"'vproj' matches no module.*did you mean 'v_proj'"):
        build(name, target_modules=["q_proj", "vproj"]).check(meta_model(tiny_settings()))


def test_ia3_feedforward_modules_must_be_targets():
    with pytest.raises(ConfigError, match="method.feedforward_modules"):
        build("ia3", target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ConfigError, match="method.target_modules: 'downproj' matches no module"):
        build("ia3", target_modules=["k_proj", "downproj"], feedforward_modules=["downproj"]).check(
            meta_model(tiny_settings()))


def test_a_method_that_cannot_adapt_the_selected_layers_says_so():
    # VeRA adapts linear layers only; an embedding is no such layer.
    with pytest.raises(ConfigError, match="vera"):
        build("vera", target_modules=["embed_tokens"]).check(meta_model(tiny_settings()))


def test_ia3_auto_on_a_model_type_peft_has_no_targets_for():
    arch = dict(model_type="phi3", vocab_size=272, hidden_size=64, intermediate_size=128,
                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = meta_model(ModelSettings(name="tiny-phi3", source="random", arch=arch))
    with pytest.raises(ConfigError, match="no default targets for model type 'phi3'.*target_modules"):
        build("ia3").check(model)


def test_ia3_auto_takes_keys_values_and_the_feed_forward_input_on_llama(tiny_model):
    model = build("ia3").apply(tiny_model(), 10)
    config = model.peft_config["default"]
    # peft's own per-architecture defaults for (IA)^3 on Llama (its constants, not ftlab's).
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS)

    assert set(config.target_modules) == set(TARGETS["llama"]) == {"k_proj", "v_proj", "down_proj"}
    assert set(config.feedforward_modules) == set(FEEDFORWARD["llama"]) == {"down_proj"}
    down = model.base_model.model.model.layers[0].mlp.down_proj
    assert down.is_feedforward and down.ia3_l["default"].shape == (1, ARCH["intermediate_size"])
    assert torch.equal(down.ia3_l["default"], torch.ones_like(down.ia3_l["default"]))  # init 1


# ----------------------------------------------------------------------------- LoRA+
def test_lora_plus_gives_b_ratio_times_the_learning_rate_whatever_the_optimizer(tiny_model):
    method = build("lora_plus", ratio=16)
    model = method.apply(tiny_model(), 10)
    groups = method.param_groups(model, lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        expected = 16e-3 if all("lora_B" in names[id(p)] for p in g["params"]) else 1e-3
        assert all(("lora_B" in names[id(p)]) == (expected == 16e-3) for p in g["params"])
        assert g["lr"] == pytest.approx(expected)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    # Groups carry their own lr: a plain SGD step moves B 16x further per unit of gradient.
    opt = torch.optim.SGD(groups, lr=123.0)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([1e-3, 16e-3])



@pytest.mark.parametrize("family,targets,also_trained,kinds", [
    # an embedding LoRA (peft gives it loraplus_lr_embedding) and a trainable RMSNorm weight (1-D)
    ("llama", ["q_proj", "v_proj", "embed_tokens"], ["model.norm.weight"], {"A", "emb", "B"}),
    # a classifier head with a bias (1-D, no decay) and a trainable LayerNorm (1-D, no decay)
    ("bert", "all-linear", ["bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias"],
     {"A", "B", "B_no_decay"}),
], ids=["llama-embedding-norm", "bert-classifier-layernorm"])
def test_lora_plus_groups_equal_peft_create_loraplus_optimizer(family, targets, also_trained, kinds):
    """Every trainable tensor gets the lr and weight decay peft's ``create_loraplus_optimizer``
    gives it: B and every 1-D tensor ratio * lr (with weight decay unless a bias or a LayerNorm
    tensor), embedding LoRA factors 1e-6, the rest lr."""
    from peft.optimizers import create_loraplus_optimizer

    from .tiny import FAMILIES

    fam = FAMILIES[family]
    lr, wd, ratio = 1e-3, 0.1, 16
    method = build("lora_plus", family=fam, ratio=ratio, target_modules=targets)
    model = method.apply(fam.load(), 10)
    names = {id(p): n for n, p in model.named_parameters()}
    for name in also_trained:
        model.get_parameter("base_model.model." + name).requires_grad_(True)

    def settings(groups) -> dict[str, tuple[float, float]]:
        out = {}
        for g in groups:
            for p in g["params"]:
                assert names[id(p)] not in out, f"{names[id(p)]} in two groups"
                out[names[id(p)]] = (g["lr"], g["weight_decay"])
        return out

    ours = settings(method.param_groups(model, lr, wd))
    reference = settings(create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                                   loraplus_weight_decay=wd).param_groups)
    assert ours == reference
    assert set(ours) == {n for n, p in model.named_parameters() if p.requires_grad}
    every = {"A": (lr, wd), "emb": (1e-6, wd), "B": (lr * ratio, wd), "B_no_decay": (lr * ratio, 0.0)}
    assert set(ours.values()) == {every[k] for k in kinds}  # the case reaches the groups it is meant to


# ----------------------------------------------------------------------------- AdaLoRA
def test_adalora_orthogonality_penalty_reaches_the_loss(tiny_model, batch):
    losses = {}
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        model = build("adalora", orth_reg_weight=weight).apply(tiny_model(), 100)
        out = model(**batch)
        logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        losses[weight] = (out.loss.item(), ce.item())
    assert losses[0.0][0] == pytest.approx(losses[0.0][1], abs=1e-6)
    assert losses[0.5][0] > losses[0.5][1] + 1e-3  # P, Q start random: far from orthogonal


def _loader(n: int = 8):
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": (ids := torch.randint(4, 260, (10,), generator=g).tolist()), "labels": ids}
                for _ in range(n)]
    return DataLoader(examples, batch_size=4, collate_fn=Collator(pad_id=0))


def _fit(method, model, steps: int, lr: float = 1e-2):
    module = FinetuneModule(model, method, OptimizerSettings(factory=torch.optim.AdamW, lr=lr),
                            SchedulerSettings(name="constant"), steps)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, train_dataloaders=_loader())
    return module


def test_adalora_allocates_ranks_in_lightning_with_the_gradients_still_present(tiny_model):
    """FinetuneModule calls after_optimizer_step right after the optimizer step; AdaLoRA reads
    the gradients there (importance = |p * grad|). Lightning zeroes them only inside the next
    step's closure, so they must still be populated, and the budget must end at target_r."""
    steps = 6
    method = build("adalora", init_r=4, target_r=2, tinit_fraction=0.0, tfinal_fraction=0.5,
                   delta_t_fraction=0.1)
    model = method.apply(tiny_model(), steps)
    seen = []
    real_hook = method.step_hook

    def checking_hook(model, step):
        grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
        seen.append((step, all(g is not None and g.abs().sum() > 0 for g in grads)))
        real_hook(model, step)

    method.step_hook = checking_hook
    _fit(method, model, steps)
    assert seen == [(s, True) for s in range(1, steps + 1)]
    config = model.peft_config["default"]
    assert (config.tinit, config.tfinal, config.total_step) == (0, 3, steps)
    # peft fixed the rank pattern at step total - tfinal and kept it: 2 of 4 singular values
    # survive per matrix on average, 4 matrices (q and v in 2 layers).
    kept = sum(int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n)
    assert config.rank_pattern and kept == 2 * 4


def test_adalora_schedule_is_a_fraction_of_the_true_total(tiny_model):
    model = build("adalora").apply(tiny_model(), 1000)
    c = model.peft_config["default"]
    # The fractions of conf/method/adalora.yaml (0.15, 0.5, 0.005) of 1000 steps.
    kw = method_kwargs("adalora")
    expected = [round(kw[f] * 1000) for f in ("tinit_fraction", "tfinal_fraction", "delta_t_fraction")]
    assert [c.total_step, c.tinit, c.tfinal, c.deltaT] == [1000, *expected] == [1000, 150, 500, 5]
    assert (c.init_r, c.target_r, c.orth_reg_weight) == (12, 8, 0.1)


# ----------------------------------------------------------------------------- validation loss
@pytest.mark.parametrize("name", ["adalora", "prompt_tuning", "p_tuning"])
def test_validation_loss_is_plain_cross_entropy(name, tiny_model):
    """Prompt models return logits for their virtual tokens too; AdaLoRA's forward adds its
    penalty to out.loss. FinetuneModule's validation loss is the plain CE of the real tokens,
    the first one predicted from the last virtual token as in peft's training loss."""
    method = build(name)
    model = method.apply(tiny_model(), 10)
    module = FinetuneModule(model, method, OptimizerSettings(factory=torch.optim.AdamW, lr=1e-3),
                            SchedulerSettings(name="constant"), 10)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False)
    val = trainer.validate(module, dataloaders=_loader(4), verbose=False)[0]["val/loss"]
    batch = next(iter(_loader(4)))
    with torch.no_grad():
        model.eval()
        logits = model(**batch).logits
    virtual = logits.shape[1] - batch["labels"].shape[1]
    labels = torch.nn.functional.pad(batch["labels"], (virtual, 0), value=-100)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                           ignore_index=-100)
    assert val == pytest.approx(ce.item(), rel=1e-5)


# ----------------------------------------------------------------------------- QLoRA and quantized bases
def test_qlora_trains_lora_over_an_nf4_base_on_the_cpu(batch):
    method = build("qlora")
    assert method.traits.base_quantization == "nf4"
    base, _ = load_model(tiny_settings(method.traits.base_quantization), seed=0)
    import bitsandbytes as bnb

    q_proj = base.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_type == "nf4" and q_proj.weight.quant_state.nested  # double quantization
    model = method.apply(base, 10)
    # The QLoRA paper's setting (Dettmers et al., arXiv 2305.14314, appendix: r = 64, alpha = 16
    # on every linear layer): A of q_proj is 64 x hidden, its update scaled by alpha / r = 1/4.
    lora_q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert lora_q.lora_A["default"].weight.shape == (64, ARCH["hidden_size"])
    assert lora_q.scaling["default"] == 16 / 64
    assert model.is_gradient_checkpointing
    model.train()
    model(**batch).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    # every linear layer but the head is adapted: 7 per layer
    adapted = {n.split(".lora_A")[0] for n in grads if ".lora_A" in n}
    assert len(adapted) == 7 * ARCH["num_hidden_layers"] and not any("lm_head" in n for n in adapted)


@pytest.mark.parametrize("name", ["dora", "lora_plus", "vera", "adalora", "ia3", "prompt_tuning"])
def test_methods_peft_allows_train_over_an_nf4_base(name, batch):
    method = build(name)
    check_quantized_base(method, "nf4", "cpu")
    base, _ = load_model(tiny_settings("nf4"), seed=0)
    model = method.apply(base, 10)
    model.train()
    model(**batch).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["loha", "lokr", "pissa", "full"])
def test_methods_that_cannot_train_over_a_quantized_base_stop_before_loading(name):
    with pytest.raises(ConfigError, match=f"{name}.*quantized base.*model.quantization=int8"):
        check_quantized_base(build(name), "int8", "cpu")


def test_qlora_refuses_an_8bit_base_and_allows_the_fp4_ablation():
    with pytest.raises(ConfigError, match="int8"):
        check_quantized_base(build("qlora"), "int8", "cpu")
    check_quantized_base(build("qlora"), "fp4", "cpu")


def test_a_quantization_the_hardware_cannot_run_stops_before_loading():
    for q in ("nf4", "fp4", "int8"):
        check_quantization(q, "cpu")  # bitsandbytes 0.50 runs all three on the CPU
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.quantization=nf4 with hardware.accelerator=gpu"):
            check_quantization("nf4", "gpu")
    with pytest.raises(ConfigError, match="hardware.strategy=fsdp"):
        check_quantization("nf4", "cpu", "fsdp")


# ----------------------------------------------------------------------------- PiSSA
def test_pissa_starts_from_the_principal_singular_part_of_w0(tiny_model):
    base = tiny_model()
    w0 = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    method = build("pissa", r=4, alpha=8)
    model = method.apply(base, 10)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    s = layer.scaling["default"]
    delta = s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    u, sv, vh = torch.linalg.svd(w0)
    torch.testing.assert_close(delta, u[:, :4] @ torch.diag(sv[:4]) @ vh[:4], atol=1e-4, rtol=0)
    torch.testing.assert_close(layer.base_layer.weight + delta, w0, atol=1e-5, rtol=0)


def test_pissa_is_saved_as_a_plain_rank_2r_lora_over_the_original_weights(tiny_model, tmp_path, batch):
    from peft import PeftConfig

    method = build("pissa", r=4)
    model = method.apply(tiny_model(), 10)
    with torch.no_grad():  # stand-in for training
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    method.save(model, tmp_path)
    config = PeftConfig.from_pretrained(str(tmp_path))
    assert config.r == 8 and config.init_lora_weights is True
    from peft import PeftModel

    plain = PeftModel.from_pretrained(tiny_model(), str(tmp_path))  # plain peft, original W0
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, model(**batch).logits, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- VeRA
def test_vera_adapts_layers_of_different_shapes_from_one_shared_pair(tiny_model):
    model = build("vera", r=16, target_modules="all-linear").apply(tiny_model(), 10)
    a, b = model.base_model.vera_A["default"], model.base_model.vera_B["default"]
    assert a.shape == (16, ARCH["intermediate_size"]) and b.shape == (ARCH["intermediate_size"], 16)
    assert not any("vera_A" in n or "vera_B" in n for n, _ in model.named_parameters())  # buffers
    lambda_b = [p for n, p in model.named_parameters() if "vera_lambda_b" in n]
    lambda_d = [p for n, p in model.named_parameters() if "vera_lambda_d" in n]
    assert len(lambda_b) == 7 * ARCH["num_hidden_layers"]
    assert all(torch.equal(p, torch.zeros_like(p)) for p in lambda_b)
    # d starts at d_initial = 0.1, the VeRA paper's (Kopiczko et al., arXiv 2310.11454) and peft's.
    assert all(torch.allclose(p, torch.full_like(p, 0.1)) for p in lambda_d)


def test_vera_projections_are_regenerated_from_the_key(tiny_model):
    one = build("vera", projection_prng_key=7).apply(tiny_model(), 10).base_model.vera_A["default"]
    two = build("vera", projection_prng_key=7).apply(tiny_model(), 10).base_model.vera_A["default"]
    other = build("vera", projection_prng_key=8).apply(tiny_model(), 10).base_model.vera_A["default"]
    assert torch.equal(one, two) and not torch.equal(one, other)


# ----------------------------------------------------------------------------- prompt family
@pytest.mark.parametrize("name", PROMPT_METHODS)
def test_only_virtual_token_parameters_train(name, tiny_model):
    model = build(name, num_virtual_tokens=3).apply(tiny_model(), 10)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("prompt_encoder.") for n in trainable)


@pytest.mark.parametrize("name,extra", [("prompt_tuning", {}), ("p_tuning", {"encoder": "mlp"}),
                                        ("p_tuning", {}), ("prefix_tuning", {}),
                                        ("prefix_tuning", {"projection": True, "encoder_hidden_size": 16})])
def test_generation_with_left_padding_matches_one_prompt_at_a_time(name, extra, tiny_model):
    """ftlab.metrics.generation batches prompts with left padding; a prompt model must answer each prompt
    the same as when it is alone."""
    from ftlab.metrics.generation import generate_answers
    from ftlab.models.tiny import byte_level_tokenizer

    tok = byte_level_tokenizer()
    model = build(name, num_virtual_tokens=4, **extra).apply(tiny_model(), 10)
    prompts = [tok("short")["input_ids"], tok("a much longer prompt")["input_ids"], tok("mid size")["input_ids"]]
    batched = generate_answers(model, tok, prompts, max_new_tokens=5, batch_size=3)
    alone = [generate_answers(model, tok, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert model.training  # generate_answers restores the mode it found


def test_prompt_tuning_vocab_and_text_inits(tiny_model, tmp_path):
    from ftlab.models.tiny import byte_level_tokenizer

    base = tiny_model()
    vocab = build("prompt_tuning", num_virtual_tokens=5, init="vocab").apply(copy.deepcopy(base), 10)
    rows = vocab.prompt_encoder["default"].embedding.weight
    table = base.get_input_embeddings().weight
    assert all((table == row).all(dim=1).any() for row in rows)  # each a vocabulary embedding
    # text: needs the tokenizer next to the weights
    with pytest.raises(ConfigError, match="method.init=text needs the model's tokenizer"):
        build("prompt_tuning", init="text", init_text="Answer:").apply(copy.deepcopy(base), 10)
    base.save_pretrained(tmp_path)
    tok = byte_level_tokenizer()
    tok.save_pretrained(tmp_path)
    saved = load_model(ModelSettings(name="t", source="local", path=str(tmp_path)))[0]
    text = build("prompt_tuning", num_virtual_tokens=4, init="text", init_text="ab").apply(saved, 10)
    ids = tok("ab")["input_ids"]
    expected = saved.get_input_embeddings().weight[(ids * 4)[:4]]
    assert torch.equal(text.prompt_encoder["default"].embedding.weight, expected)


@pytest.mark.parametrize("name", PROMPT_METHODS)
def test_prompt_adapter_loads_for_inference_with_the_same_outputs(name, tiny_model, tmp_path, batch):
    method = build(name, num_virtual_tokens=3)
    model = method.apply(tiny_model(), 10)
    method.save(model, tmp_path)
    loaded = build(name).load(tiny_model(), tmp_path)
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)
