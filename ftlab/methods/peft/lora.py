"""LoRA and the methods that keep its weights: DoRA, PiSSA, LoRA+, QLoRA; and VeRA.

The builders turn ftlab's shared, flat hyperparameter names (``r``, ``alpha``, ``dropout``,
``target_modules``) into a peft config and check their ranges before peft is imported.
docs/methods.md has each method's rule and defaults. ``method.backend=native`` builds
ftlab's own implementation of LoRA or VeRA (``ftlab/methods/native/``) instead.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ftlab.errors import ConfigError, check_choice, check_fraction, check_positive
from ftlab.methods.base import Traits, trainable_parameters
from ftlab.methods.checks import check_bool, check_int, check_low_rank, check_targets
from ftlab.methods.peft.wrapper import PeftMethod
from ftlab.methods.registry import register


@register("lora")
def lora(
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    target_modules: list[str] | str = ("q_proj", "v_proj"),
    backend: str = "peft",
    use_rslora: bool = False,
    bias: str = "none",
):
    """LoRA, Hu et al. 2021 (arXiv 2106.09685): h = W0 x + (alpha/r) B A x."""
    from peft import LoraConfig

    check_low_rank(r, alpha, dropout)
    targets = check_targets(target_modules)
    if backend == "native":
        from ftlab.methods.native.lora import build_native_lora

        return build_native_lora(r=r, alpha=alpha, dropout=dropout, target_modules=targets,
                                 use_rslora=use_rslora, bias=bias)
    if backend != "peft":
        raise ConfigError(f"method.backend must be 'peft' or 'native', got {backend!r}")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        use_rslora=use_rslora,
        bias=bias,
        task_type="CAUSAL_LM",
    )
    return PeftMethod("lora", config, traits=Traits(quantized_base=True, size_knob="r"))


def _lora_config(r, alpha, dropout, targets, **extra):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                      task_type="CAUSAL_LM", **extra)


@register("dora")
def dora(r: int = 8, alpha: float = 16, dropout: float = 0.05,
         target_modules: list[str] | str = ("q_proj", "v_proj")) -> PeftMethod:
    """DoRA, Liu et al. 2024 (arXiv 2402.09353): weight-decomposed low-rank adaptation.

        W' = m * (W0 + s B A) / ||W0 + s B A||_c,   s = alpha / r,

    with ``||.||_c`` the norm of each output row (peft keeps W as out x in), m initialised to
    ``||W0||_c`` and the norm treated as a constant in the backward pass (paper, Sec. 4.3).
    Trains A, B and m: ``sum over adapted layers of r * (in + out) + out``. Merges exactly.
    """
    check_low_rank(r, alpha, dropout)
    targets = check_targets(target_modules)
    # m * W0 / ||W0|| equals W0 only up to rounding: the model is not bit-identical at step 0.
    return PeftMethod("dora", _lora_config(r, alpha, dropout, targets, use_dora=True),
                      traits=Traits(quantized_base=True, changes_model_at_init=True, size_knob="r"))


@register("pissa")
def pissa(r: int = 8, alpha: float = 8, dropout: float = 0.0,
          target_modules: list[str] | str = ("q_proj", "v_proj"), svd_niter: int | None = None) -> PeftMethod:
    """PiSSA, Meng et al. 2024 (arXiv 2404.02948): LoRA initialised from the principal
    singular directions of W0 = U S V^T:

        A = S_r^{1/2} V_r^T / sqrt(s),  B = U_r S_r^{1/2} / sqrt(s),  W_res = W0 - s B A (frozen),

    so the model is unchanged at step 0 but the adapter holds W0's top-r part. Trains A and B:
    ``sum r * (in + out)``. ``svd_niter=None`` uses the exact SVD; an integer uses peft's fast
    randomized SVD with that many subspace iterations. Saved as the equivalent plain LoRA
    (rank 2r) over the original W0, so the artifact needs no residual base model.
    """
    check_low_rank(r, alpha, dropout)
    targets = check_targets(target_modules)
    if svd_niter is not None:
        check_int("method.svd_niter", svd_niter, minimum=1)
    init = "pissa" if svd_niter is None else f"pissa_niter_{svd_niter}"
    # The residual split rewrites W0 (float weights only) and is not bit-exact at step 0.
    return PeftMethod("pissa", _lora_config(r, alpha, dropout, targets, init_lora_weights=init),
                      traits=Traits(changes_model_at_init=True, size_knob="r"), save_as_lora=True)


@register("lora_plus")
def lora_plus(r: int = 8, alpha: float = 16, dropout: float = 0.05,
              target_modules: list[str] | str = ("q_proj", "v_proj"), ratio: float = 16) -> PeftMethod:
    """LoRA+, Hayou, Ghosh, Yu 2024 (arXiv 2402.12354): plain LoRA weights, but B learns
    faster than A: ``lr_B = ratio * lr_A`` (ratio = lambda > 1; 2^4 = 16 as recommended).

    The groups are those of peft's ``create_loraplus_optimizer`` (:func:`loraplus_groups`),
    each carrying its own lr, so it works with whatever optimizer class the config names.
    Trains ``sum r * (in + out)``.
    """
    check_low_rank(r, alpha, dropout)
    targets = check_targets(target_modules)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 1:
        raise ConfigError(f"method.ratio must be a number > 1 (lr_B = ratio * lr_A), got {ratio!r}")
    return PeftMethod("lora_plus", _lora_config(r, alpha, dropout, targets),
                      traits=Traits(quantized_base=True, size_knob="r"),
                      groups=lambda model, lr, wd: loraplus_groups(model, lr, wd, float(ratio)))


LORAPLUS_LR_EMBEDDING = 1e-6  # peft's default loraplus_lr_embedding


def loraplus_groups(model: nn.Module, lr: float, weight_decay: float, ratio: float) -> list[dict[str, Any]]:
    """peft's ``create_loraplus_optimizer`` grouping (peft/optimizers/loraplus.py), over the
    trainable tensors:

    - LoRA factors of an embedding layer: ``lr = 1e-6`` (peft's ``loraplus_lr_embedding``), decay;
    - B, and every 1-D tensor (a classifier's bias, a trainable norm weight): ``lr = ratio * lr``,
      with weight decay unless its name holds ``bias`` or it belongs to a ``nn.LayerNorm``;
    - everything else (A, a classifier's weight matrix): ``lr``, with weight decay.

    ``weight_decay`` plays peft's ``loraplus_weight_decay``. Empty groups are left out."""
    in_layernorm = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    a, embedding, b, b_no_decay = [], [], [], []
    for name, p in trainable_parameters(model):
        if ".lora_embedding_" in name:
            embedding.append(p)
        elif "lora_B" in name or p.ndim == 1:
            (b_no_decay if "bias" in name or id(p) in in_layernorm else b).append(p)
        else:
            a.append(p)
    groups = [{"params": a, "lr": lr, "weight_decay": weight_decay},
              {"params": embedding, "lr": LORAPLUS_LR_EMBEDDING, "weight_decay": weight_decay},
              {"params": b, "lr": lr * ratio, "weight_decay": weight_decay},
              {"params": b_no_decay, "lr": lr * ratio, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@register("vera")
def vera(r: int = 256, d_initial: float = 0.1, projection_prng_key: int = 0, dropout: float = 0.0,
         target_modules: list[str] | str = ("q_proj", "v_proj"), save_projection: bool = True,
         backend: str = "peft"):
    """VeRA, Kopiczko, Blankevoort, Asano 2023 (arXiv 2310.11454):

        h = W0 x + diag(b) B diag(d) A x,

    A (r x in) and B (out x r) frozen, random, shared by all adapted layers and regenerated from
    ``projection_prng_key``; trainable b (out, init 0) and d (r, init ``d_initial``):
    ``sum over adapted layers of (out + r)``. Layers of different shapes use slices of one
    pair sized for the largest of them (peft >= 0.12). Merges exactly.
    """
    check_positive("method.r", r, integer=True)
    check_fraction("method.dropout", dropout)
    if isinstance(d_initial, bool) or not isinstance(d_initial, (int, float)) or not d_initial > 0:
        raise ConfigError(f"method.d_initial must be a positive number, got {d_initial!r}")
    check_int("method.projection_prng_key", projection_prng_key, minimum=0)
    check_bool("method.save_projection", save_projection)
    targets = check_targets(target_modules)
    check_choice("method.backend", backend, ("peft", "native"))
    if backend == "native":
        from ftlab.methods.native.vera import build_native_vera

        return build_native_vera(r=r, d_initial=d_initial, projection_prng_key=projection_prng_key,
                                 dropout=dropout, target_modules=targets, save_projection=save_projection)
    from peft import VeraConfig

    config = VeraConfig(r=r, d_initial=float(d_initial), projection_prng_key=projection_prng_key,
                        vera_dropout=dropout, target_modules=targets, save_projection=save_projection,
                        task_type="CAUSAL_LM")
    # VeRA's rank r sizes the frozen shared A, B and the trainable d (r per adapted layer).
    return PeftMethod("vera", config, traits=Traits(quantized_base=True, size_knob="r"))


@register("qlora")
def qlora(r: int = 64, alpha: float = 16, dropout: float = 0.05,
          target_modules: list[str] | str = "all-linear", gradient_checkpointing: bool = True) -> PeftMethod:
    """QLoRA, Dettmers et al. 2023 (arXiv 2305.14314): LoRA over a frozen base stored in 4-bit
    NormalFloat with double quantization of the block constants (bitsandbytes), computing in
    the model's dtype. The paper's recipe: LoRA on every linear layer but the output head,
    r = 64, alpha = 16, dropout 0.05 (0.1 for 7-13B), gradient checkpointing; its lr 2e-4,
    max grad norm 0.3, constant schedule and 3% warmup are optimizer/trainer settings.

    ``traits.base_quantization = "nf4"`` makes the run load the base quantized (``model.quantization=fp4``
    may replace NF4 for the paper's FP4 ablation). Trains ``sum r * (in + out)``.
    """
    check_low_rank(r, alpha, dropout)
    targets = check_targets(target_modules)
    check_bool("method.gradient_checkpointing", gradient_checkpointing)
    return PeftMethod("qlora", _lora_config(r, alpha, dropout, targets),
                      traits=Traits(quantized_base=True, base_quantization="nf4", size_knob="r",
                                    gradient_checkpointing=gradient_checkpointing))
