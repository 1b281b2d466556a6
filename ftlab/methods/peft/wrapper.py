"""A method whose layers, saving and loading are peft's: :class:`PeftMethod`.

Every peft-backed method (``ftlab/methods/peft/*.py``) is one :class:`PeftMethod` holding a
peft config and the few fields that set it apart; this module also turns peft's errors into
one-line messages and adapts configs to the model (classification heads, GPT-2's Conv1D,
the meta device).
"""

from __future__ import annotations

import copy
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ftlab.errors import ConfigError
from ftlab.methods.base import Traits, default_param_groups
from ftlab.methods.quantized import is_quantized
from ftlab.methods.targets import check_target_names, fmt_targets, linear_module_names


@dataclass
class PeftMethod:
    """A method whose layers, saving and loading are peft's.

    What sets one peft method apart from another is composed from plain fields, not subclasses:

    - ``peft_config``: a peft config, or a function ``total_steps -> config`` for a method whose
      config depends on the length of the run (AdaLoRA's rank budget schedule);
    - ``groups(model, lr, weight_decay)``: the method's own optimizer groups (LoRA+);
    - ``step_hook(model, step)``: work after each optimizer step (AdaLoRA's rank allocation);
    - ``traits``: what the rest of ftlab needs to know (:class:`~ftlab.methods.base.Traits`:
      its quantized base, whether it merges or packs, whether it recomputes activations);
    - ``save_as_lora``: PiSSA rewrites the frozen weight into a residual, so the trained
      adapter is saved as the equivalent plain LoRA over the original weight;
    - ``model_state``: ``(get, set)`` for training state peft keeps in the model outside its
      parameters (AdaLoRA's importance scores and rank pattern), saved with the method state
      so a resumed run continues exactly;
    - ``penalty(model)``: a penalty on the trained parameters that peft's forward adds to the
      loss only when it is given labels, which ftlab's loss path does not give (AdaLoRA's
      orthogonality penalty); :meth:`regularizer` hands it to the training step.
    """

    name: str
    peft_config: Any
    traits: Traits = Traits(quantized_base=True)
    state: dict[str, Any] = field(default_factory=dict)
    groups: Callable[[nn.Module, float, float], list[dict[str, Any]]] | None = None
    step_hook: Callable[[nn.Module, int], None] | None = None
    save_as_lora: bool = False
    model_state: tuple[Callable[[nn.Module], dict], Callable[[nn.Module, dict], None]] | None = None
    penalty: Callable[[nn.Module], Any] | None = None
    _model: nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    def config(self, total_steps: int):
        """A fresh peft config for a run of ``total_steps`` optimizer steps (peft mutates the
        config it is given, so every model gets its own copy)."""
        if callable(self.peft_config):
            return self.peft_config(total_steps)
        return copy.deepcopy(self.peft_config)

    def check(self, model: nn.Module) -> None:
        """Apply the method to a copy of the meta-device ``model``: every target must name a
        module, and peft must accept the model. Initialisations that need real weights (PiSSA's
        SVD) or files (a prompt initialised from text) are replaced by plain ones here."""
        from peft import get_peft_model

        config = shapes_only(self.config(_CHECK_STEPS))
        match_task(config, model)
        check_target_names(model, config)
        try:
            get_peft_model(copy.deepcopy(model), config)
        except (ValueError, TypeError, NotImplementedError, KeyError) as err:
            msg = " ".join(str(err).split())
            targets = getattr(config, "target_modules", None)
            if "not found in the base model" in msg or "No layers types compatible" in msg:
                raise ConfigError(
                    f"method.target_modules={fmt_targets(targets)} matches no layer method {self.name!r} "
                    f"can adapt; this model's linear layers are: {', '.join(linear_module_names(model))}"
                ) from None
            unsupported = re.search(r"Target module of type <class '[\w.]*?(\w+)'> not supported", msg)
            if unsupported:
                kind = unsupported.group(1)
                raise ConfigError(
                    f"method {self.name!r} cannot adapt this model's {kind} layers "
                    f"(method.target_modules={fmt_targets(targets)}): peft's {self.name} supports nn.Linear, "
                    f"nn.Conv1d and nn.Conv2d only"
                    + (" (GPT-2-style models store their projections as transformers' Conv1D); use "
                       "lora, dora, pissa, vera, adalora or ia3, which handle Conv1D"
                       if kind == "Conv1D" else "")
                ) from None
            if "specify `target_modules`" in msg or "Please specify" in msg:
                model_type = getattr(getattr(model, "config", None), "model_type", "?")
                raise ConfigError(
                    f"method {self.name!r} has no default targets for model type {model_type!r}; "
                    "set method.target_modules (and method.feedforward_modules for ia3) explicitly"
                ) from None
            raise ConfigError(f"method {self.name!r} cannot apply to this model: {msg[:400]}") from None

    def apply(self, model: nn.Module, total_steps: int) -> nn.Module:
        from peft import get_peft_model, get_peft_model_state_dict

        config = self.config(total_steps)
        match_task(config, model)
        on_meta = any(p.is_meta for p in model.parameters())
        if on_meta:
            # Planning on the meta device (dry runs, parameter counts): shapes only.
            config = shapes_only(config)
        if is_quantized(model):
            if not self.traits.quantized_base:
                raise ConfigError(f"method {self.name!r} cannot train over a quantized base model")
            from peft import prepare_model_for_kbit_training

            # Freezes the base, upcasts its non-quantized half-precision tensors (norms,
            # embeddings) to fp32 and, for QLoRA, turns on gradient checkpointing.
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=self.traits.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        if str(getattr(config, "prompt_tuning_init", "")).upper().endswith("TEXT"):
            config.tokenizer_name_or_path = _tokenizer_dir(model, self.name)
        peft_model = get_peft_model(model, config)
        if on_meta:
            # peft re-wraps adapter tensors it moves to the meta device as new Parameters, which
            # drops requires_grad=False from AdaLoRA's rank counter (a constant, never trained).
            for name, p in peft_model.named_parameters():
                if ".ranknum." in name:
                    p.requires_grad_(False)
        if self.save_as_lora and not on_meta:
            # The adapter as initialised, kept (small: r * (in + out) per layer) so that save()
            # can express the trained one as a plain LoRA over the original weights.
            self.state["initial_adapter"] = {
                k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(peft_model).items()
            }
        self._model = peft_model
        return peft_model

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """The method's own ``groups``, else :func:`default_param_groups`; each group carries
        its own ``lr``, so LoRA+ works with any optimizer class."""
        if self.groups is not None:
            return self.groups(model, lr, weight_decay)
        return default_param_groups(model, lr, weight_decay)

    def build_optimizer(self, model: nn.Module, lr: float, weight_decay: float):
        return None  # the configured optimizer over param_groups

    def regularizer(self, model: nn.Module):
        return self.penalty(model) if self.penalty is not None else None

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        if self.step_hook is not None:
            self.step_hook(model, step)

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.state)
        if self.model_state is not None and self._model is not None:
            state["model_state"] = self.model_state[0](self._model)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        saved = state.pop("model_state", None)
        self.state = state
        if saved is not None and self.model_state is not None and self._model is not None:
            self.model_state[1](self._model, saved)

    def save(self, model: nn.Module, directory: Path) -> None:
        if not (self.save_as_lora and "initial_adapter" in self.state):
            model.save_pretrained(str(directory))
            return
        from safetensors.torch import save_file

        # peft turns "trained minus initial" into a rank-2r LoRA that applies to the original
        # (unmodified) base weights; it reads the initial adapter from a directory.
        with tempfile.TemporaryDirectory(prefix="ftlab-pissa-") as tmp:
            initial = Path(tmp) / "initial_adapter"
            initial.mkdir()
            save_file({k: v.contiguous() for k, v in self.state["initial_adapter"].items()},
                      str(initial / "adapter_model.safetensors"))
            model.save_pretrained(str(directory), path_initial_model_for_weight_conversion=str(initial))
        # The conversion keeps only the low-rank factors; a classifier's trained head (listed in
        # the config's modules_to_save) goes back in beside them.
        from peft import get_peft_model_state_dict
        from safetensors.torch import load_file

        others = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()
                  if ".lora_" not in k}
        if others:
            weights = Path(directory) / "adapter_model.safetensors"
            save_file({**load_file(str(weights)), **others}, str(weights), metadata={"format": "pt"})

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        from peft import PeftConfig, PeftModel

        # peft loads prompt-learning adapters for inference only: what was saved is the final
        # virtual-token embeddings, the prompt encoder (p-tuning, prefix projection) is gone.
        trainable = not PeftConfig.from_pretrained(str(directory)).is_prompt_learning
        return PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)


_CHECK_STEPS = 1000  # stands in for the run length when a config needs one (AdaLoRA) in check()


def shapes_only(config):
    """The config with initialisations that read data replaced by plain ones of the same
    shapes: PiSSA's SVD needs real weights, a text-initialised prompt a tokenizer on disk.
    For the meta device, where only shapes exist (check, dry runs, parameter counts)."""
    if str(getattr(config, "init_lora_weights", "")).startswith("pissa"):
        config.init_lora_weights = True
    if str(getattr(config, "prompt_tuning_init", "")).upper().endswith("TEXT"):
        from peft import PromptTuningInit

        config.prompt_tuning_init = PromptTuningInit.RANDOM
        config.prompt_tuning_init_text = config.tokenizer_name_or_path = None
    return config


def match_task(config, model: nn.Module) -> None:
    """Fit the peft config to the model. A sequence-classification model gets peft's SEQ_CLS task
    type: peft then trains its new head (``score``/``classifier``) along with the adapter and
    saves it in the adapter files. Conv1D layers get fan_in_fan_out; prefix tuning gets the
    model's key/value heads where its config does not name them (Falcon's multi-query)."""
    if (getattr(config, "task_type", None) == "CAUSAL_LM"
            and type(model).__name__.endswith("ForSequenceClassification")):
        config.task_type = "SEQ_CLS"
    if hasattr(config, "fan_in_fan_out") and not config.fan_in_fan_out:
        # GPT-2-style Conv1D layers store W as (in, out); peft fixes the flag itself, with a warning.
        from transformers.pytorch_utils import Conv1D

        config.fan_in_fan_out = any(isinstance(m, Conv1D) for m in model.modules())
    if getattr(config, "peft_type", None) == "PREFIX_TUNING" and config.num_attention_heads is None:
        _prefix_key_value_heads(config, model)


def _prefix_key_value_heads(config, model: nn.Module) -> None:
    """Prefix tuning trains one key and one value prefix per key/value head. peft reads their
    number from ``num_key_value_heads`` in the model's config, else takes ``num_attention_heads``;
    Falcon's multi-query attention (one key/value head shared by all query heads) has neither
    in its config, so peft built 4-head prefixes for a 1-head cache and the forward failed. The
    attention layers' own ``num_kv_heads`` and ``head_dim`` say it."""
    model_config = getattr(model, "config", None)
    if model_config is None or getattr(model_config, "num_key_value_heads", None) is not None:
        return
    layer = next((m for m in model.modules() if isinstance(getattr(m, "num_kv_heads", None), int)
                  and isinstance(getattr(m, "head_dim", None), int)), None)
    if layer is not None and layer.num_kv_heads != getattr(model_config, "num_attention_heads", None):
        config.num_attention_heads = layer.num_kv_heads
        config.token_dim = layer.num_kv_heads * layer.head_dim


def _tokenizer_dir(model: nn.Module, method_name: str) -> str:
    """The directory the model was loaded from, if its tokenizer was saved there: peft's
    text initialisation tokenizes the init text with it."""
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    path = Path(source)
    if source and path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return str(path)
    raise ConfigError(
        f"method {method_name!r} with method.init=text needs the model's tokenizer on disk, "
        f"next to its weights; this model was not loaded from such a directory "
        f"({source or 'built in code'}). Use method.init=random or method.init=vocab"
    )
