"""Plain helpers for the method tests: the tiny model families, method settings from conf/,
the cases.

Kept apart from conftest.py (which only holds fixtures) so test modules can import them at
collection time, when the parametrization is built.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ftlab.config import ModelSettings
from ftlab.methods import available, build_method

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf" / "method"
MODEL_CONF = REPO / "conf" / "model"


@dataclass(frozen=True, eq=False)  # compared by identity: the arch dict is not hashable
class Family:
    """One tiny random architecture the method matrix runs on.

    ``arch`` is the model's transformers config; ``task`` picks the head (``causal_lm``: the
    language-model head, labels = the input ids; ``seq_cls``: a new classification head with
    one output per label, labels one class id per row); ``model_conf`` is the
    ``conf/model/<name>.yaml`` whose ``target_modules`` a run's ``${model.target_modules}``
    resolves to.
    """

    name: str
    arch: dict[str, Any]
    task: str
    model_conf: str
    labels: tuple[str, ...] = ()

    def settings(self, quantization: str = "none") -> ModelSettings:
        return ModelSettings(name=f"tiny-{self.name}-test", source="random", arch=dict(self.arch),
                             task=self.task, tasks=[self.task], target_modules=self.target_modules,
                             quantization=quantization)

    def load(self, quantization: str = "none", seed: int = 0):
        """A fresh model, identical on every call with the same seed."""
        from ftlab.models import load_model

        model, _ = load_model(self.settings(quantization), seed=seed, labels=list(self.labels) or None)
        return model

    @property
    def target_modules(self) -> list[str]:
        return list(OmegaConf.load(MODEL_CONF / f"{self.model_conf}.yaml").target_modules)

    def batch(self, rows: int = 2, length: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
        """A fixed batch: random token ids (no special tokens), no padding, and the task's labels."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(4, 260, (rows, length), generator=g)
        if self.task == "seq_cls":
            labels = torch.arange(rows) % len(self.labels)  # every class present, one id per row
        else:
            labels = ids.clone()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


# Hidden 64 and intermediate 128 are multiples of bitsandbytes' 4-bit block size (64), so the
# same models also load in NF4. initializer_range=0.2 instead of the usual 0.02: with 0.02 a
# random (frozen) language-model head spans about +-1 in logits, and no method that leaves the
# head frozen could halve the loss of any batch (GPT-2's head is its token embedding matrix,
# tied). BERT's classification head trains with every method, but with 0.02 the random encoder
# maps every input to nearly the same pooled vector, the more so when the pooled first position
# is a virtual token: prompt tuning and p-tuning got from 0.69 to 0.42 at best in 200 steps.
# Dropout is off (Llama has none): the loss curve then measures the method, not dropout noise,
# and the same adapter reaches the same loss whichever backend (peft, native) implements it.
ARCH: dict[str, Any] = dict(
    model_type="llama", vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
    tie_word_embeddings=False, initializer_range=0.2,
)
GPT2_ARCH: dict[str, Any] = dict(
    model_type="gpt2", vocab_size=272, n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=256,
    tie_word_embeddings=True, initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    # The byte-level tokenizer's ids: GPT-2's defaults (50256) lie outside this vocabulary.
    bos_token_id=1, eos_token_id=2,
)
BERT_ARCH: dict[str, Any] = dict(
    model_type="bert", vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=256, type_vocab_size=2, initializer_range=0.2,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
# Falcon-7B's layout at tiny size (conf/model/falcon-7b.yaml): one fused query_key_value layer,
# multi-query attention (4 query heads share one key/value head, so the layer is 64 -> 64 + 2 x 16),
# attention and MLP in parallel on one layer norm, no biases, rotary positions, head tied to the
# embeddings. Falcon has no intermediate_size: its MLP is 4 x hidden (dense_h_to_4h, dense_4h_to_h).
FALCON_ARCH: dict[str, Any] = dict(
    model_type="falcon", vocab_size=272, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    multi_query=True, new_decoder_architecture=False, parallel_attn=True, bias=False, alibi=False,
    max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.2,
    hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=1, eos_token_id=2,
)
LLAMA = Family("llama", ARCH, "causal_lm", "tiny-llama")
GPT2 = Family("gpt2", GPT2_ARCH, "causal_lm", "tiny-gpt2")
BERT = Family("bert", BERT_ARCH, "seq_cls", "tiny-bert", labels=("negative", "positive"))
FALCON = Family("falcon", FALCON_ARCH, "causal_lm", "falcon-7b")  # targets: [query_key_value]
FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, GPT2, BERT, FALCON)}

HEAD_DIM = ARCH["hidden_size"] // ARCH["num_attention_heads"]
KV_DIM = HEAD_DIM * ARCH["num_key_value_heads"]
MODEL_TARGETS = ["q_proj", "v_proj"]  # what ${model.target_modules} resolves to with tiny-llama


def tiny_settings(quantization: str = "none") -> ModelSettings:
    return LLAMA.settings(quantization)


def method_kwargs(name: str, *, family: Family | None = None, **overrides: Any) -> dict[str, Any]:
    """The flat keys of ``conf/method/<name>.yaml``, resolved the way a run on ``family``
    (default: the tiny Llama) resolves them."""
    targets = family.target_modules if family is not None else MODEL_TARGETS
    cfg = OmegaConf.merge({"model": {"target_modules": targets}}, {"method": OmegaConf.load(CONF / f"{name}.yaml")})
    kwargs = OmegaConf.to_container(cfg, resolve=True)["method"]
    kwargs.pop("name")
    kwargs.pop("lr", None)  # the method's default learning rate is the optimizer's, as in a run
    kwargs.update(overrides)
    return kwargs


def cases() -> list[tuple[str, str, dict[str, Any]]]:
    """``(case id, method name, overrides)`` for every registered method, plus the native
    backend of every method whose config has a ``backend`` key."""
    out = []
    for name in available():
        out.append((name, name, {}))
        if (CONF / f"{name}.yaml").is_file() and "backend" in OmegaConf.load(CONF / f"{name}.yaml"):
            out.append((f"{name}[native]", name, {"backend": "native"}))
    return out


def build(name: str, *, family: Family | None = None, **overrides: Any):
    return build_method(name, **method_kwargs(name, family=family, **overrides))


def plain_model(arch: str):
    """A bare transformers Llama or GPT-2 (2 layers, hidden 32), seeded, for the tests that
    compare a native method with peft or a formula on the model class itself."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0))


def plain_batch() -> dict[str, torch.Tensor]:
    """Two rows of 12 random ids for :func:`plain_model` (labels = inputs)."""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def fixed_batch(rows: int = 2, length: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny Llama's fixed batch (:meth:`Family.batch`)."""
    return LLAMA.batch(rows, length, seed)


# ---------------------------------------------------------------------------- the real CLI
def run_many(commands: dict[str, list[str]], timeout: int = 600) -> dict[str, subprocess.CompletedProcess]:
    """``python -m ftlab ARGS`` for every entry, as many at once as there are cores: most of a
    short run is importing torch, transformers, peft and Lightning, one core each."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}

    def one(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ftlab", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {key: pool.submit(one, args) for key, args in commands.items()}
        return {key: f.result() for key, f in futures.items()}


# ------------------------------------------------------------------- out-of-range values
# (method, key, value as typed on the command line): one bad value per hyperparameter of the
# peft-backed methods. The error must name ``method.<key>``.
BAD_VALUES: list[tuple[str, str, str]] = [
    ("dora", "r", "0"), ("dora", "alpha", "0"), ("dora", "dropout", "1.0"), ("dora", "target_modules", "[]"),
    ("pissa", "r", "-1"), ("pissa", "alpha", "-2"), ("pissa", "dropout", "-0.1"), ("pissa", "svd_niter", "0"),
    ("lora_plus", "ratio", "1"), ("lora_plus", "r", "2.5"), ("lora_plus", "alpha", "0"),
    ("lora_plus", "dropout", "1.5"),
    ("vera", "r", "0"), ("vera", "d_initial", "0"), ("vera", "dropout", "1"),
    ("vera", "projection_prng_key", "-1"), ("vera", "save_projection", "maybe"), ("vera", "backend", "jax"),
    ("qlora", "r", "0"), ("qlora", "alpha", "-16"), ("qlora", "dropout", "1"),
    ("qlora", "gradient_checkpointing", "maybe"),
    ("adalora", "init_r", "0"), ("adalora", "target_r", "12"), ("adalora", "alpha", "0"),
    ("adalora", "dropout", "1"), ("adalora", "tinit_fraction", "0.6"), ("adalora", "tfinal_fraction", "-0.1"),
    ("adalora", "delta_t_fraction", "0"), ("adalora", "beta1", "1"), ("adalora", "beta2", "0"),
    ("adalora", "orth_reg_weight", "-1"),
    ("ia3", "target_modules", "[]"), ("ia3", "feedforward_modules", "[down_proj]"),
    ("loha", "r", "0"), ("loha", "alpha", "0"), ("loha", "rank_dropout", "1"), ("loha", "module_dropout", "-0.5"),
    ("lokr", "r", "0"), ("lokr", "alpha", "-1"), ("lokr", "rank_dropout", "2"), ("lokr", "module_dropout", "1"),
    ("lokr", "decompose_factor", "0"), ("lokr", "decompose_both", "maybe"),
    ("prompt_tuning", "num_virtual_tokens", "0"), ("prompt_tuning", "init", "zeros"),
    ("prompt_tuning", "init_text", "''"),
    ("p_tuning", "num_virtual_tokens", "-3"), ("p_tuning", "encoder", "gru"),
    ("p_tuning", "encoder_hidden_size", "0"), ("p_tuning", "encoder_num_layers", "0"),
    ("p_tuning", "encoder_dropout", "1"),
    ("prefix_tuning", "num_virtual_tokens", "0"), ("prefix_tuning", "projection", "maybe"),
    ("prefix_tuning", "encoder_hidden_size", "0"),
]
# Values that are bad only next to another setting.
BAD_CONTEXT: dict[tuple[str, str], dict[str, str]] = {
    ("prompt_tuning", "init_text"): {"init": "text"},
}


class ScaledLinear(torch.nn.Linear):
    """A linear layer whose forward takes an extra argument (``scale``), as some models' layers
    do: a native adapter layer must pass such arguments through to the layer it wraps."""

    def forward(self, x, scale=1.0):
        return super().forward(x) * scale
