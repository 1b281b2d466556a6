"""A quantized frozen base: which quantization a run loads, and whether method and hardware allow it."""

from __future__ import annotations

from torch import nn

from ftlab.errors import ConfigError


def is_quantized(model: nn.Module) -> bool:
    """Whether the model's linear layers are bitsandbytes 4-bit or 8-bit layers."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return True
    return any(m.__class__.__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())


def base_quantization(method, model_quantization: str) -> str:
    """The quantization the base model loads with: ``model.quantization``, or the method's own
    (QLoRA's nf4) when the model asks for none."""
    own = method.traits.base_quantization
    return own if own and model_quantization == "none" else model_quantization


def check_quantized_base(method, model_quantization: str, accelerator: str, strategy: str = "auto") -> None:
    """Refuse, before any weight loads, a quantized base the method or the hardware cannot use.

    peft puts LoRA (DoRA, LoRA+), VeRA, AdaLoRA and (IA)^3 over bitsandbytes layers and leaves
    prompt methods' layers alone; LoHa and LoKr wrap only nn.Linear/Conv, PiSSA's SVD needs
    float weights, and full fine-tuning cannot step 4/8-bit weights: each method declares it in
    ``traits.quantized_base``.
    """
    quantization = base_quantization(method, model_quantization)
    if quantization == "none":
        return
    name = method.name
    own = method.traits.base_quantization
    if own == "nf4" and quantization not in ("nf4", "fp4"):
        raise ConfigError(f"method {name!r} trains over a 4-bit base (nf4); model.quantization="
                          f"{quantization} contradicts it: use method=lora model.quantization={quantization}")
    if not method.traits.quantized_base:
        raise ConfigError(f"method {name!r} cannot train over a quantized base model "
                          f"(model.quantization={quantization}); use model.quantization=none")
    from ftlab.models.loading import check_quantization

    check_quantization(quantization, accelerator, strategy)
