"""(IA)^3 and the LyCORIS adapters LoHa and LoKr (peft-backed)."""

from __future__ import annotations

from ftlab.errors import ConfigError, check_fraction, check_positive
from ftlab.methods.base import Traits
from ftlab.methods.checks import check_bool, check_int, check_targets
from ftlab.methods.peft.wrapper import PeftMethod
from ftlab.methods.registry import register

IA3_AUTO = "auto"


@register("ia3")
def ia3(target_modules: list[str] | str = IA3_AUTO, feedforward_modules: list[str] | str = IA3_AUTO) -> PeftMethod:
    """(IA)^3, Liu et al. 2022 (arXiv 2205.05638): learned vectors, initialised to 1, rescale
    the keys, the values and the feed-forward hidden activation:

        k = l_k * (W_k x),  v = l_v * (W_v x),  ffn = W_down (l_ff * h).

    ``auto`` takes peft's targets for the model type (Llama: k_proj, v_proj and the
    feed-forward down_proj, whose input is scaled). Trains ``sum out(k) + out(v) + in(down)``
    per layer. Merges exactly (the vectors fold into W's rows or columns).
    """
    targets = None if target_modules == IA3_AUTO else check_targets(target_modules)
    if feedforward_modules == IA3_AUTO:
        feedforward = None
    else:
        feedforward = check_targets(feedforward_modules)
        if feedforward == "all-linear":
            raise ConfigError("method.feedforward_modules must list module names (or be auto)")
    if (targets is None) != (feedforward is None):
        raise ConfigError("method.target_modules and method.feedforward_modules must both be auto "
                          "or both be lists")
    if isinstance(targets, list) and not set(feedforward) <= set(targets):
        raise ConfigError(f"method.feedforward_modules {feedforward} must be a subset of "
                          f"method.target_modules {targets}")
    from peft import IA3Config

    return PeftMethod("ia3", IA3Config(target_modules=targets, feedforward_modules=feedforward,
                                       task_type="CAUSAL_LM"))


def _check_lycoris(r, alpha, rank_dropout, module_dropout) -> None:
    check_positive("method.r", r, integer=True)
    check_positive("method.alpha", alpha)
    check_fraction("method.rank_dropout", rank_dropout)
    check_fraction("method.module_dropout", module_dropout)


@register("loha")
def loha(r: int = 8, alpha: float = 8, rank_dropout: float = 0.0, module_dropout: float = 0.0,
         target_modules: list[str] | str = ("q_proj", "v_proj")) -> PeftMethod:
    """LoHa, Hyeon-Woo et al. (FedPara) 2021 (arXiv 2108.06098): a Hadamard product of two
    rank-r factorisations,

        dW = (alpha / r) (W1a W1b) * (W2a W2b),   W1a, W2a: out x r, W1b, W2b: r x in,

    whose rank can reach r^2. W2b starts at 0 so dW = 0. Trains ``sum 2 r (in + out)``.
    peft's LoHa has no input dropout: ``rank_dropout`` drops rows of dW, ``module_dropout``
    skips the whole adapter per step. Adapts nn.Linear/Conv layers, not bitsandbytes ones.
    """
    _check_lycoris(r, alpha, rank_dropout, module_dropout)
    targets = check_targets(target_modules)
    from peft import LoHaConfig

    config = LoHaConfig(r=r, alpha=alpha, rank_dropout=rank_dropout, module_dropout=module_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    return PeftMethod("loha", config, traits=Traits(quantized_base=False, size_knob="r"))


@register("lokr")
def lokr(r: int = 8, alpha: float = 8, rank_dropout: float = 0.0, module_dropout: float = 0.0,
         target_modules: list[str] | str = ("q_proj", "v_proj"), decompose_both: bool = False,
         decompose_factor: int = -1) -> PeftMethod:
    """LoKr (LyCORIS), Yeh et al. 2023 (arXiv 2309.14859): a Kronecker product,

        dW = (alpha / r) W1 (x) (W2a W2b),

    with out = a * c and in = b * d factored near their square roots (``decompose_factor=-1``)
    or with one factor fixed; W1 is a x b, W2 is c x d, low-rank (W2a: c x r, W2b: r x d) when
    r < max(c, d) / 2 and a full c x d matrix otherwise; ``decompose_both`` also factors W1.
    W1 starts at 0 so dW = 0. Adapts nn.Linear/Conv layers, not bitsandbytes ones.
    """
    _check_lycoris(r, alpha, rank_dropout, module_dropout)
    targets = check_targets(target_modules)
    check_bool("method.decompose_both", decompose_both)
    if decompose_factor != -1:
        check_int("method.decompose_factor", decompose_factor, minimum=1)
    from peft import LoKrConfig

    config = LoKrConfig(r=r, alpha=alpha, rank_dropout=rank_dropout, module_dropout=module_dropout,
                        target_modules=targets, decompose_both=decompose_both,
                        decompose_factor=decompose_factor, task_type="CAUSAL_LM")
    return PeftMethod("lokr", config, traits=Traits(quantized_base=False, size_knob="r"))
