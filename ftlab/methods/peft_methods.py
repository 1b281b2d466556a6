"""Methods built on peft, and full fine-tuning.

Every peft-backed method (LoRA, DoRA, PiSSA, LoRA+, VeRA, QLoRA, AdaLoRA, (IA)^3, LoHa, LoKr,
prompt tuning, p-tuning, prefix tuning) is one :class:`PeftMethod` holding a peft config and
the few fields that set it apart; the builders below turn ftlab's shared, flat hyperparameter
names (``r``, ``alpha``, ``dropout``, ``target_modules``) into that config and check their
ranges before anything loads. docs/methods.md has each method's rule and defaults.
"""

from __future__ import annotations

import copy
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ftlab.errors import ConfigError, check_choice, check_fraction, check_positive, did_you_mean
from ftlab.methods.base import PlainHooks, default_param_groups, trainable_parameters
from ftlab.methods.registry import register


def check_targets(target_modules) -> list[str] | str:
    if target_modules == "all-linear":
        return target_modules
    if isinstance(target_modules, str):
        return [target_modules]
    targets = list(target_modules or [])
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(
            f"method.target_modules must be a list of module names or 'all-linear', got {target_modules!r}"
        )
    return targets


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers a low-rank method can target (what 'all-linear' means)."""
    from transformers.pytorch_utils import Conv1D

    names = {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D)) or m.__class__.__name__ in ("Linear4bit", "Linear8bitLt")
    }
    names.discard("lm_head")
    return sorted(names)


@dataclass
class PeftMethod:
    """A method whose layers, saving and loading are peft's.

    What sets one peft method apart from another is composed from plain fields, not subclasses:

    - ``peft_config``: a peft config, or a function ``total_steps -> config`` for a method whose
      config depends on the length of the run (AdaLoRA's rank budget schedule);
    - ``lr_scale``: learning-rate multipliers by parameter-name marker (LoRA+: ``{"lora_B": 16}``);
    - ``step_hook(model, step)``: work after each optimizer step (AdaLoRA's rank allocation);
    - ``base_quantization``: the quantization its frozen base needs (QLoRA: ``"nf4"``);
    - ``supports_quantized_base``: whether peft can put this method over bitsandbytes layers;
    - ``gradient_checkpointing``: recompute activations on a k-bit base (QLoRA's recipe);
    - ``save_as_lora``: PiSSA rewrites the frozen weight into a residual, so the trained
      adapter is saved as the equivalent plain LoRA over the original weight;
    - ``model_state``: ``(get, set)`` for training state peft keeps in the model outside its
      parameters (AdaLoRA's importance scores and rank pattern), saved with the method state
      so a resumed run continues exactly;
    - ``regularizer(model)``: a penalty on the trained parameters that peft's forward adds to
      the loss only when it is given labels, which FinetuneModule's loss path does not give
      (AdaLoRA's orthogonality penalty); the module adds it once per optimizer step.
    """

    name: str
    peft_config: Any
    state: dict[str, Any] = field(default_factory=dict)
    base_quantization: str | None = None
    supports_quantized_base: bool = True
    gradient_checkpointing: bool = False
    lr_scale: dict[str, float] = field(default_factory=dict)
    step_hook: Callable[[nn.Module, int], None] | None = None
    save_as_lora: bool = False
    model_state: tuple[Callable[[nn.Module], dict], Callable[[nn.Module, dict], None]] | None = None
    regularizer: Callable[[nn.Module], Any] | None = None
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
                    f"method.target_modules={_fmt(targets)} matches no layer method {self.name!r} "
                    f"can adapt; this model's linear layers are: {', '.join(linear_module_names(model))}"
                ) from None
            unsupported = re.search(r"Target module of type <class '[\w.]*?(\w+)'> not supported", msg)
            if unsupported:
                kind = unsupported.group(1)
                raise ConfigError(
                    f"method {self.name!r} cannot adapt this model's {kind} layers "
                    f"(method.target_modules={_fmt(targets)}): peft's {self.name} supports nn.Linear, "
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
            if not self.supports_quantized_base:
                raise ConfigError(f"method {self.name!r} cannot train over a quantized base model")
            from peft import prepare_model_for_kbit_training

            # Freezes the base, upcasts its non-quantized half-precision tensors (norms,
            # embeddings) to fp32 and, for QLoRA, turns on gradient checkpointing.
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=self.gradient_checkpointing,
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
        """:func:`default_param_groups`, further split by learning-rate multiplier; each group
        carries its own ``lr``, so LoRA+ works with any optimizer class."""
        if not self.lr_scale:
            return default_param_groups(model, lr, weight_decay)
        buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
        for name, p in trainable_parameters(model):
            scale = next((s for marker, s in self.lr_scale.items() if marker in name), 1.0)
            buckets.setdefault((scale, p.ndim >= 2), []).append(p)
        return [{"params": params, "lr": lr * scale, "weight_decay": weight_decay if decay else 0.0}
                for (scale, decay), params in sorted(buckets.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]

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
    """A sequence-classification model gets peft's SEQ_CLS task type: peft then trains its new
    head (``score``/``classifier``) along with the adapter and saves it in the adapter files."""
    if (getattr(config, "task_type", None) == "CAUSAL_LM"
            and type(model).__name__.endswith("ForSequenceClassification")):
        config.task_type = "SEQ_CLS"
    if hasattr(config, "fan_in_fan_out") and not config.fan_in_fan_out:
        # GPT-2-style Conv1D layers store W as (in, out); peft fixes the flag itself, with a warning.
        from transformers.pytorch_utils import Conv1D

        config.fan_in_fan_out = any(isinstance(m, Conv1D) for m in model.modules())


def is_quantized(model: nn.Module) -> bool:
    """Whether the model's linear layers are bitsandbytes 4-bit or 8-bit layers."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return True
    return any(m.__class__.__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())


def check_target_names(model: nn.Module, config) -> None:
    """Every listed target (and IA3 feed-forward module) must name at least one module, by
    peft's rule: the full module path or its suffix after a dot. peft itself only fails when
    *no* target matches, so a typo next to a valid name would silently adapt less."""
    names = [n for n, _ in model.named_modules() if n]
    for key, attr in (("target_modules", "target_modules"), ("feedforward_modules", "feedforward_modules")):
        targets = getattr(config, attr, None)
        if targets is None or isinstance(targets, str):
            continue  # "all-linear", a regex, or peft's per-architecture default
        for t in sorted(targets):
            if not any(n == t or n.endswith("." + t) for n in names):
                raise ConfigError(
                    f"method.{key}: {t!r} matches no module of this model"
                    f"{did_you_mean(t, linear_module_names(model))}; "
                    f"its linear layers are: {', '.join(linear_module_names(model))}"
                )


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


def _fmt(targets) -> str:
    if isinstance(targets, (set, list, tuple)):
        return "[" + ",".join(sorted(targets)) + "]"
    return str(targets)


@dataclass
class FullFinetune(PlainHooks):
    """Full fine-tuning: every weight trains; saved as a complete model directory."""

    name: str = "full"
    base_quantization: str | None = None
    supports_quantized_base: bool = False  # 4-bit and 8-bit weights cannot take gradient steps

    def check(self, model: nn.Module) -> None:
        pass

    def apply(self, model: nn.Module, total_steps: int) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(str(directory))

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        # The same class as the base (a causal LM, or a classifier with its trained head).
        return type(model).from_pretrained(str(directory), dtype=model.dtype)


@register("full")
def full() -> FullFinetune:
    return FullFinetune()


def check_low_rank(r, alpha, dropout) -> None:
    check_positive("method.r", r, integer=True)
    check_positive("method.alpha", alpha)
    check_fraction("method.dropout", dropout)


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
    return PeftMethod("lora", config)


# --------------------------------------------------------------------------------------------
# Builders: flat config keys -> PeftMethod, every range checked before peft is imported (a bad
# value costs the user 2 seconds, not the 5 that importing peft and bitsandbytes takes).


def check_int(key: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def check_bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")


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
    return PeftMethod("dora", _lora_config(r, alpha, dropout, targets, use_dora=True))


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
    return PeftMethod("pissa", _lora_config(r, alpha, dropout, targets, init_lora_weights=init),
                      supports_quantized_base=False, save_as_lora=True)


@register("lora_plus")
def lora_plus(r: int = 8, alpha: float = 16, dropout: float = 0.05,
              target_modules: list[str] | str = ("q_proj", "v_proj"), ratio: float = 16) -> PeftMethod:
    """LoRA+, Hayou, Ghosh, Yu 2024 (arXiv 2402.12354): plain LoRA weights, but B learns
    faster than A: ``lr_B = ratio * lr_A`` (ratio = lambda > 1; 2^4 = 16 as recommended).

    Implemented in :meth:`PeftMethod.param_groups` (B's groups carry ``ratio * lr``), so it
    works with whatever optimizer class the config names. Trains ``sum r * (in + out)``.
    """
    check_low_rank(r, alpha, dropout)
    targets = check_targets(target_modules)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 1:
        raise ConfigError(f"method.ratio must be a number > 1 (lr_B = ratio * lr_A), got {ratio!r}")
    return PeftMethod("lora_plus", _lora_config(r, alpha, dropout, targets), lr_scale={"lora_B": float(ratio)})


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
    return PeftMethod("vera", config)


@register("qlora")
def qlora(r: int = 64, alpha: float = 16, dropout: float = 0.05,
          target_modules: list[str] | str = "all-linear", gradient_checkpointing: bool = True) -> PeftMethod:
    """QLoRA, Dettmers et al. 2023 (arXiv 2305.14314): LoRA over a frozen base stored in 4-bit
    NormalFloat with double quantization of the block constants (bitsandbytes), computing in
    the model's dtype. The paper's recipe: LoRA on every linear layer but the output head,
    r = 64, alpha = 16, dropout 0.05 (0.1 for 7-13B), gradient checkpointing; its lr 2e-4,
    max grad norm 0.3, constant schedule and 3% warmup are optimizer/trainer settings.

    ``base_quantization = "nf4"`` makes the run load the base quantized (``model.quantization=fp4``
    may replace NF4 for the paper's FP4 ablation). Trains ``sum r * (in + out)``.
    """
    check_low_rank(r, alpha, dropout)
    targets = check_targets(target_modules)
    check_bool("method.gradient_checkpointing", gradient_checkpointing)
    return PeftMethod("qlora", _lora_config(r, alpha, dropout, targets), base_quantization="nf4",
                      gradient_checkpointing=gradient_checkpointing)


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
                      model_state=(adalora_state, load_adalora_state), regularizer=adalora_penalty)


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
    return PeftMethod("loha", config, supports_quantized_base=False)


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
    return PeftMethod("lokr", config, supports_quantized_base=False)


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
    return PeftMethod("prompt_tuning", config)


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
    return PeftMethod("p_tuning", config)


@register("prefix_tuning")
def prefix_tuning(num_virtual_tokens: int = 20, projection: bool = False,
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
    return PeftMethod("prefix_tuning", config)


# --------------------------------------------------------------------------------------------
# A quantized frozen base: which quantization, and whether the method and hardware allow it.


def base_quantization(method, model_quantization: str) -> str:
    """The quantization the base model loads with: ``model.quantization``, or the method's own
    (QLoRA's nf4) when the model asks for none."""
    own = getattr(method, "base_quantization", None)
    return own if own and model_quantization == "none" else model_quantization


def check_quantized_base(method, model_quantization: str, accelerator: str, strategy: str = "auto") -> None:
    """Refuse, before any weight loads, a quantized base the method or the hardware cannot use.

    peft puts LoRA (DoRA, LoRA+), VeRA, AdaLoRA and (IA)^3 over bitsandbytes layers and leaves
    prompt methods' layers alone; LoHa and LoKr wrap only nn.Linear/Conv, PiSSA's SVD needs
    float weights, and full fine-tuning cannot step 4/8-bit weights. A method from elsewhere
    declares ``supports_quantized_base = True`` to be allowed here.
    """
    quantization = base_quantization(method, model_quantization)
    if quantization == "none":
        return
    name = getattr(method, "name", type(method).__name__)
    own = getattr(method, "base_quantization", None)
    if own == "nf4" and quantization not in ("nf4", "fp4"):
        raise ConfigError(f"method {name!r} trains over a 4-bit base (nf4); model.quantization="
                          f"{quantization} contradicts it: use method=lora model.quantization={quantization}")
    if not getattr(method, "supports_quantized_base", False):
        raise ConfigError(f"method {name!r} cannot train over a quantized base model "
                          f"(model.quantization={quantization}); use model.quantization=none")
    from ftlab.models.loading import check_quantization

    check_quantization(quantization, accelerator, strategy)
