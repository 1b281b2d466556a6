"""``model=auto``: any Hugging Face model from ``model.path`` alone, without a YAML of its own.

``model.path`` is a local model directory or a hub id (``Org/Name``). The curated files in
``conf/model/`` carry what a run needs to know about an architecture before any weight loads
(its heads, the modules methods adapt by default, the architecture for the meta-device checks).
For ``model=auto`` these come from the checkpoint's own ``config.json``, read with
``AutoConfig`` (a few KB: the local directory, the Hugging Face cache, or the hub when it is
reachable):

- ``target_modules``: peft's defaults for the architecture
  (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``: ``q_proj, v_proj`` for Llama,
  ``c_attn`` for GPT-2, ``query, value`` for BERT), or ``all-linear`` for a type peft has no
  default for;
- ``tasks``: the heads transformers has for the type: ``causal_lm`` when it has a causal-LM
  class and is not an encoder (a type with a masked-LM head, such as BERT, is one: its
  causal-LM class is a decoder variant), ``seq_cls`` when it has a sequence-classification
  class. ``model.task`` (``causal_lm``, or ``seq_cls`` from ``data=classification``) picks one;
- ``name``: the last part of the path (``Org/Name`` -> ``Name``), for logs and result tables.

This is resolved in the entry point's config conversion, before interpolation, so every method
config that reads ``${model.target_modules}`` sees the concrete list.
"""

from __future__ import annotations

from ftlab.errors import ConfigError
from ftlab.models.loading import is_hub_id, read_config

AUTO = "auto"


def default_targets(model_type: str) -> list[str] | str:
    """peft's default LoRA targets for the architecture, else ``all-linear``."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    return list(targets) if targets else "all-linear"


def heads(config) -> list[str]:
    """The heads (``model.tasks``) transformers offers for this config's architecture."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

    kind = config.model_type
    found = []
    encoder = kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not encoder:
        found.append("causal_lm")
    if kind in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        found.append("seq_cls")
    if not found:
        raise ConfigError(f"model type {kind!r} has neither a causal-LM nor a sequence-classification "
                          "class in transformers, so ftlab cannot train it")
    return found


def resolve_auto(model: dict) -> dict:
    """``model=auto``'s blanks (``auto`` values) filled from the checkpoint's config.

    ``model`` is the ``model`` node of the config before interpolation; other models are
    returned unchanged. Raises :class:`ConfigError` without ``model.path``, and
    :class:`ModelNotFoundError` when the path is neither a model directory nor a hub id this
    machine can reach (local cache, or the hub)."""
    if model.get("source") != AUTO:
        return model
    path = model.get("path")
    if not path:
        raise ConfigError("model=auto reads the model from model.path: give a local model "
                          "directory or a hub id, e.g. model.path=/data/my-model or "
                          "model.path=HuggingFaceTB/SmolLM2-135M-Instruct")
    config = read_config(str(path))
    out = dict(model)
    out["source"] = "hub" if is_hub_id(str(path)) else "local"
    if out.get("name") in (None, AUTO):
        out["name"] = str(path).rstrip("/").split("/")[-1] or AUTO
    if out.get("target_modules") in (None, AUTO):
        out["target_modules"] = default_targets(config.model_type)
    if out.get("tasks") in (None, AUTO):
        out["tasks"] = heads(config)
    return out
