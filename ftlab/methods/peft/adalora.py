"""AdaLoRA: LoRA in SVD form whose rank budget is reallocated during training."""

from __future__ import annotations

from typing import Any

from torch import nn

from ftlab.errors import ConfigError, check_fraction, check_positive
from ftlab.methods.checks import check_targets
from ftlab.methods.peft.wrapper import PeftMethod
from ftlab.methods.registry import register


@register("adalora")
def adalora(init_r: int = 12, target_r: int = 8, alpha: float = 16, dropout: float = 0.0,
            target_modules: list[str] | str = ("q_proj", "v_proj"), tinit_fraction: float = 0.15,
            tfinal_fraction: float = 0.5, delta_t_fraction: float = 0.005, beta1: float = 0.85,
            beta2: float = 0.85, orth_reg_weight: float = 0.1) -> PeftMethod:
    """AdaLoRA, Zhang et al. 2023 (arXiv 2303.10512): the update in SVD form,

        dW = (alpha / init_r) P diag(lambda) Q,  P: out x init_r, Q: init_r x in,

    with singular values of low importance (sensitivity x uncertainty, EMAs beta1/beta2) masked
    on a cubic budget schedule from ``init_r`` to an average of ``target_r`` per matrix, and
    ``orth_reg_weight * (||P^T P - I||_F + ||Q Q^T - I||_F)`` (averaged) added to the loss by
    peft's forward. The schedule is set in fractions of the run: ``tinit`` warm-up steps without
    pruning, ``tfinal`` final steps at the fixed budget, a reallocation every ``deltaT`` steps.
    Trains ``sum init_r * (in + out + 1)`` (P, Q and lambda; masked entries stay in place).
    """
    check_positive("method.init_r", init_r, integer=True)
    check_positive("method.target_r", target_r, integer=True)
    if target_r >= init_r:
        raise ConfigError(f"method.target_r must be smaller than method.init_r={init_r}, got {target_r}")
    check_positive("method.alpha", alpha)
    check_fraction("method.dropout", dropout)
    targets = check_targets(target_modules)
    for key, value in (("tinit_fraction", tinit_fraction), ("tfinal_fraction", tfinal_fraction)):
        check_fraction(f"method.{key}", value)
    if tinit_fraction + tfinal_fraction >= 1:
        raise ConfigError("method.tinit_fraction + method.tfinal_fraction must be < 1 (the budget "
                          f"needs steps to shrink in), got {tinit_fraction} + {tfinal_fraction}")
    if isinstance(delta_t_fraction, bool) or not isinstance(delta_t_fraction, (int, float)) \
            or not 0 < delta_t_fraction < 1:
        raise ConfigError(f"method.delta_t_fraction must be in (0, 1), got {delta_t_fraction!r}")
    for key, value in (("beta1", beta1), ("beta2", beta2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ConfigError(f"method.{key} must be in (0, 1), got {value!r}")
    if isinstance(orth_reg_weight, bool) or not isinstance(orth_reg_weight, (int, float)) or orth_reg_weight < 0:
        raise ConfigError(f"method.orth_reg_weight must be a number >= 0, got {orth_reg_weight!r}")

    def config(total_steps: int):
        from peft import AdaLoraConfig

        check_positive("total steps", total_steps, integer=True)
        tinit = int(tinit_fraction * total_steps)
        tfinal = int(tfinal_fraction * total_steps)  # tinit < total - tfinal since the sum < 1
        delta_t = max(1, round(delta_t_fraction * total_steps))
        return AdaLoraConfig(init_r=init_r, target_r=target_r, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules=targets, tinit=tinit, tfinal=tfinal, deltaT=delta_t,
                             beta1=beta1, beta2=beta2, orth_reg_weight=orth_reg_weight,
                             total_step=total_steps, task_type="CAUSAL_LM")

    return PeftMethod("adalora", config, step_hook=adalora_allocate,
                      model_state=(adalora_state, load_adalora_state), penalty=adalora_penalty)


def adalora_penalty(model: nn.Module):
    """AdaLoRA's orthogonality penalty as peft's ``AdaLoraModel.forward`` adds it to a loss:

        orth_reg_weight * mean_m ||M_m - I||_F,   M = A A^T (lora_A: r x in), B^T B (lora_B: out x r),

    over every ``lora_A``/``lora_B`` of the trained adapter; None when there is none."""
    import torch

    base = model.base_model
    name = base.trainable_adapter_name
    weight = base.peft_config[name].orth_reg_weight
    terms = []
    for n, p in base.model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and name in n and p.numel():
            cov = p @ p.T if "lora_A" in n else p.T @ p
            terms.append(torch.norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device), p="fro"))
    if not terms or not weight:
        return None
    return weight * torch.stack(terms).mean()


def adalora_allocate(model: nn.Module, step: int) -> None:
    """AdaLoRA's importance update and budget mask after optimizer step ``step`` (1-based).

    peft wants the 0-based index of the step just taken (its examples and the authors' code
    count from 0): the first update then always precedes the final forced mask at
    ``total_step - tfinal``, which needs at least one importance estimate. It reads the
    gradients (p * grad), which are still in place here: Lightning zeroes them right before
    the next backward, inside the next step's closure.
    """
    model.base_model.update_and_allocate(step - 1)


_ADALORA_SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def adalora_state(model: nn.Module) -> dict[str, Any]:
    """The rank allocator's state outside the parameters: the importance estimates (smoothed
    sensitivity and uncertainty per adapter entry) and the rank pattern of the last mask,
    which later masks reuse. Without them a resumed run would rank from scratch."""
    allocator = model.base_model.rankallocator
    config = model.peft_config[model.base_model.trainable_adapter_name]
    state = {key: {n: t.detach().clone() for n, t in getattr(allocator, key).items()} for key in _ADALORA_SCORES}
    state["rank_pattern"] = {k: [bool(b) for b in v] for k, v in (config.rank_pattern or {}).items()}
    return state


def load_adalora_state(model: nn.Module, state: dict[str, Any]) -> None:
    allocator = model.base_model.rankallocator
    config = model.peft_config[model.base_model.trainable_adapter_name]
    device = next(p.device for p in model.parameters())
    for key in _ADALORA_SCORES:
        setattr(allocator, key, {n: t.to(device) for n, t in state[key].items()})
    config.rank_pattern = {k: list(v) for k, v in state["rank_pattern"].items()} or None
