"""The prompt family: prompt tuning, p-tuning and prefix tuning (peft-backed).

They add trainable virtual tokens (or key/value prefixes) instead of changing a weight: the
model's outputs change as soon as they are applied, they cannot merge into the weights, and
peft drops the position ids that keep packed examples apart.
"""

from __future__ import annotations

from ftlab.errors import ConfigError, check_choice, check_fraction, check_positive
from ftlab.methods.base import Traits
from ftlab.methods.checks import check_bool
from ftlab.methods.peft.wrapper import PeftMethod
from ftlab.methods.registry import register

PROMPT_TRAITS = Traits(
    mergeable=False, packing=False, changes_model_at_init=True, quantized_base=True,
    size_knob="num_virtual_tokens",
    merge_note="it trains virtual tokens that are prepended to every input, not a change to any "
               "weight. Export the adapter instead (--adapter OUT); peft.PeftModel.from_pretrained"
               "(base, OUT) loads it")

PROMPT_INITS = ("random", "vocab", "text")


@register("prompt_tuning")
def prompt_tuning(num_virtual_tokens: int = 20, init: str = "random", init_text: str | None = None) -> PeftMethod:
    """Prompt tuning, Lester, Al-Rfou, Constant 2021 (arXiv 2104.08691): k trainable soft-prompt
    embeddings (k x d_model) prepended to the input embeddings; the model stays frozen.
    ``init``: random (N(0, 1)), vocab (embeddings of k tokens sampled from the vocabulary) or
    text (the embeddings of ``init_text``'s tokens, repeated to k). Trains ``k * d_model``.
    """
    check_positive("method.num_virtual_tokens", num_virtual_tokens, integer=True)
    check_choice("method.init", init, PROMPT_INITS)
    if init == "text" and not (isinstance(init_text, str) and init_text.strip()):
        raise ConfigError("method.init_text must be a non-empty string when method.init=text")
    from peft import PromptTuningConfig, PromptTuningInit

    kind = {"random": PromptTuningInit.RANDOM, "vocab": PromptTuningInit.SAMPLE_VOCAB,
            "text": PromptTuningInit.TEXT}[init]
    # TEXT needs a tokenizer path, known only once the model is loaded: a placeholder here,
    # replaced by the model's directory in apply().
    config = PromptTuningConfig(num_virtual_tokens=num_virtual_tokens, prompt_tuning_init=kind,
                                prompt_tuning_init_text=init_text if init == "text" else None,
                                tokenizer_name_or_path="<model>" if init == "text" else None,
                                task_type="CAUSAL_LM")
    return PeftMethod("prompt_tuning", config, traits=PROMPT_TRAITS)


@register("p_tuning")
def p_tuning(num_virtual_tokens: int = 20, encoder: str = "lstm", encoder_hidden_size: int | None = None,
             encoder_num_layers: int = 2, encoder_dropout: float = 0.0) -> PeftMethod:
    """P-tuning, Liu et al. 2021, "GPT Understands, Too" (arXiv 2103.10385): k virtual-token
    embeddings passed through a trainable prompt encoder, a bidirectional LSTM followed by a
    two-layer ReLU MLP (the paper's choice) or an MLP alone, then prepended to the input.
    ``encoder_hidden_size=None`` means d_model. The encoder is a training-time
    reparameterisation: the saved adapter holds only its k x d_model output.
    """
    check_positive("method.num_virtual_tokens", num_virtual_tokens, integer=True)
    check_choice("method.encoder", encoder, ("lstm", "mlp"))
    if encoder_hidden_size is not None:
        check_positive("method.encoder_hidden_size", encoder_hidden_size, integer=True)
    check_positive("method.encoder_num_layers", encoder_num_layers, integer=True)
    check_fraction("method.encoder_dropout", encoder_dropout)
    if encoder == "mlp" and encoder_num_layers != 2:
        raise ConfigError("method.encoder_num_layers applies to encoder=lstm only (peft's MLP "
                          f"encoder has a fixed depth), got {encoder_num_layers}")
    from peft import PromptEncoderConfig

    config = PromptEncoderConfig(num_virtual_tokens=num_virtual_tokens,
                                 encoder_reparameterization_type=encoder.upper(),
                                 encoder_hidden_size=encoder_hidden_size, encoder_num_layers=encoder_num_layers,
                                 encoder_dropout=encoder_dropout, task_type="CAUSAL_LM")
    return PeftMethod("p_tuning", config, traits=PROMPT_TRAITS)


@register("prefix_tuning")
def prefix_tuning(num_virtual_tokens: int = 20, projection: bool = True,
                  encoder_hidden_size: int | None = None) -> PeftMethod:
    """Prefix tuning, Li and Liang 2021 (arXiv 2101.00190): trainable key and value prefixes of
    k positions at every layer, attended to by every token. Without projection it trains
    ``k * layers * 2 * d_kv`` (d_kv = kv heads x head dim, so grouped-query attention shrinks
    it); with ``projection`` the prefixes come from k x d_kv embeddings through a
    Linear-Tanh-Linear MLP of width ``encoder_hidden_size`` (None: d_kv), the paper's
    reparameterisation for stable training. Saved as the final prefixes either way.
    """
    check_positive("method.num_virtual_tokens", num_virtual_tokens, integer=True)
    check_bool("method.projection", projection)
    if encoder_hidden_size is not None:
        check_positive("method.encoder_hidden_size", encoder_hidden_size, integer=True)
        if not projection:
            raise ConfigError("method.encoder_hidden_size applies only with method.projection=true")
    from peft import PrefixTuningConfig

    config = PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, prefix_projection=projection,
                                encoder_hidden_size=encoder_hidden_size, task_type="CAUSAL_LM")
    return PeftMethod("prefix_tuning", config, traits=PROMPT_TRAITS)
