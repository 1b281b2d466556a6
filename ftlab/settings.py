"""From Hydra's composed config to typed settings: the one place a ``DictConfig`` is read.

``settings_from_config`` turns the config the CLI composed (or a run's saved ``config.yaml``)
into :class:`~ftlab.config.RunSettings`; everything below it takes plain typed arguments and
can be called from Python without Hydra. ``config_dir``/``sweeps_dir`` find ``conf/`` and
``sweeps/`` in a checkout or inside an installed wheel.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

from ftlab.config import (LOGGERS, DataSettings, DryRunSettings, EvalSettings, HardwareSettings,
                          LoggerSettings, LossSettings, ModelSettings, MonitorSettings, OptimizerSettings, RunSettings,
                          SchedulerSettings, build)
from ftlab.errors import ConfigError, did_you_mean
from ftlab.methods.registry import import_plugins


def config_dir() -> Path:
    """``conf/`` of a checkout (or editable install), or the copy inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise RuntimeError(f"ftlab's conf/ directory was not found next to {here}")


def sweeps_dir() -> Path:
    """``sweeps/`` beside ``conf/``: at the top of a checkout, or inside an installed wheel."""
    return config_dir().parent / "sweeps"


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def settings_from_config(cfg, run_dir: str) -> RunSettings:
    """Turn a composed ``DictConfig`` into :class:`~ftlab.config.RunSettings`."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    _fill_auto_model(cfg)
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("hydra", None)  # resolving hydra.* needs the job's runtime; ftlab needs none of it
    try:
        c = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"cannot resolve the config: {first_line(err)}") from None
    optimizer_cfg = dict(c["optimizer"])
    try:
        # Plain lists, not ListConfig: an optimizer that keeps ``betas`` as given (bitsandbytes')
        # would put an omegaconf object into the checkpoint, which torch.load(weights_only=True)
        # refuses on resume.
        factory = instantiate(cfg.optimizer, _convert_="all")
    except Exception as err:  # noqa: BLE001
        raise ConfigError(explain_optimizer_error(optimizer_cfg.get("_target_"), err)) from None
    plugins = list(c.get("plugins") or [])
    import_plugins(plugins)  # before the method is built: an outside method registers here
    sweep_name = c.get("sweep_name")
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = cfg.hydra if "hydra" in cfg else HydraConfig.get()
        if sweep_name is None and str(hc.mode) == "RunMode.MULTIRUN":
            sweep_name = Path(str(hc.sweep.dir)).name
    except Exception:  # noqa: BLE001  no Hydra runtime: a saved config read from Python
        pass
    return RunSettings(
        run_dir=run_dir,
        method=dict(c["method"]),
        model=build(ModelSettings, c["model"], "model"),
        data=build(DataSettings, c["data"], "data"),
        optimizer=OptimizerSettings(factory=factory, lr=_scaled(optimizer_cfg.get("lr"), c.get("lr_scale")),
                                    weight_decay=optimizer_cfg.get("weight_decay", 0.0)),
        scheduler=build(SchedulerSettings, c["scheduler"], "scheduler"),
        hardware=build(HardwareSettings, c["hardware"], "hardware"),
        logger=logger_settings(c.get("logger")),
        eval=build(EvalSettings, c["eval"], "eval"),
        trainer=dict(c["trainer"]),
        seed=c["seed"],
        dry_run=build(DryRunSettings, c["dry_run"] if isinstance(c["dry_run"], dict)
                      else {"enabled": c["dry_run"]}, "dry_run"),
        checkpoint_every_n_steps=c["checkpoint"]["every_n_steps"],
        monitor=build(MonitorSettings, c["monitor"], "monitor"),
        loss=build(LossSettings, c.get("loss") or {}, "loss"),  # absent from runs saved before it
        sweep_name=sweep_name,
        callbacks={k: v for k, v in (c.get("callbacks") or {}).items() if v is not None},
        plugins=plugins,
        budget=(c.get("budget") or {}).get("trainable_params") if isinstance(c.get("budget") or {}, dict)
        else c.get("budget"),
    )


def logger_settings(node: dict[str, Any] | None) -> LoggerSettings:
    """``logger: {csv: {}, wandb: {project: ...}}`` (one node per chosen logger, conf/logger/)
    as settings; a run saved before several loggers could be combined has ``logger: {name: csv}``."""
    node = dict(node or {})
    if "name" in node:
        names = (node.pop("name"),)
        return build(LoggerSettings, {**node, "names": names}, "logger")
    for name, options in node.items():
        if name not in LOGGERS:
            raise ConfigError(f"unknown logger {name!r}{did_you_mean(name, LOGGERS)}; loggers: "
                              f"{', '.join(LOGGERS)}, any of them together (logger=[csv,wandb]), "
                              "many (all three) or none")
        if name != "wandb" and options:
            raise ConfigError(f"logger.{name} takes no settings, got {', '.join(options)}")
    return build(LoggerSettings, dict(node.get("wandb") or {}), "logger.wandb", names=tuple(node))


def _fill_auto_model(cfg) -> None:
    """``model=auto``: its heads, default targets and name come from ``model.path``'s
    config.json (:mod:`ftlab.models.auto`). They are written into ``cfg`` itself, so the method
    configs' ``${model.target_modules}`` and the run's saved config.yaml see them."""
    from omegaconf import OmegaConf, open_dict, read_write

    from ftlab.models.auto import AUTO, resolve_auto

    if "model" not in cfg or cfg.model.get("source") != AUTO:
        return
    filled = resolve_auto(OmegaConf.to_container(cfg.model, resolve=False))
    with read_write(cfg), open_dict(cfg):
        for key, value in filled.items():
            if cfg.model.get(key) != value:
                cfg.model[key] = value


def _scaled(lr: float | None, scale: float | None) -> float | None:
    """The learning rate times ``lr_scale`` (conf/train.yaml), which must be positive."""
    if scale is None or scale == 1 or lr is None:
        return lr
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise ConfigError(f"lr_scale must be a positive number, got {scale!r}")
    return float(lr) * float(scale)


def explain_optimizer_error(target: str | None, err: Exception) -> str:
    """One line for an optimizer config that cannot be built (``err``: what Hydra raised); a
    package that cannot be imported (bitsandbytes missing, or its native library broken) says
    which, why and what to do instead."""
    package = str(target or "").split(".")[0]
    if package:
        try:
            importlib.import_module(package)
        except Exception as missing:  # noqa: BLE001  any import failure means it cannot run here
            detail = " ".join(str(missing).split())[:200]
            advice = ("pip install 'bitsandbytes>=0.50', or use optimizer=adamw"
                      if package == "bitsandbytes" else f"install {package}, or use optimizer=adamw")
            return (f"optimizer {target} needs the {package} package, which cannot be imported "
                    f"here ({type(missing).__name__}: {detail}); {advice}")
    return f"cannot build optimizer {target!r}: {first_line(err.__cause__ or err)}"


def resolved(cfg) -> dict[str, Any]:
    """The config as plain containers with every interpolation resolved (``hydra.*`` left out)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("hydra", None)
    return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)


def explain_compose_error(err: Exception, compose, name: str, job: list[str]) -> str:
    from hydra.errors import MissingConfigException

    text = str(err)
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        m = re.search(r"Could not find '(.+)/([^/']+)'", text)
        if m:
            group, option = m.groups()
            options = list(err.options or [])
            hint = ""
            if group.startswith("hydra/"):
                hint = " (Hydra plugins for sweeps and SLURM: pip install -e \".[sweeps]\")"
            return (f"unknown {group} {option!r}{did_you_mean(option, options)}; "
                    f"valid {group} options: {', '.join(options)}{hint}")
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    if m:
        key = m.group(1)
        parent, _, leaf = key.rpartition(".")
        # The keys valid here depend on the chosen options (method=vera has other keys).
        choices = [o for o in job if "=" in o and "." not in o.split("=", 1)[0]]
        try:
            base = compose(name, overrides=choices)
        except Exception:  # noqa: BLE001
            base = compose(name)
        node = base
        for part in parent.split(".") if parent else []:
            node = node.get(part) if hasattr(node, "get") else None
        siblings = list(node.keys()) if hasattr(node, "keys") else []
        where = f"'{parent}'" if parent else "the top level"
        valid = f"; keys under {where}: {', '.join(map(str, siblings))}" if siblings else ""
        close = did_you_mean(leaf, siblings).replace("'", f"'{parent}." if parent else "'", 1)
        return (f"unknown config key {key!r}{close}{valid}. "
                f"To add a new key on purpose, write +{key}=...")
    m = re.search(r"Could not load '([^']+)'", text)
    if m:
        group, _, option = m.group(1).rpartition("/")  # one of a list of options: logger=[csv,foo]
        options = sorted(p.stem for p in (config_dir() / group).glob("*.yaml")) if group else []
        if options and option not in options:
            return (f"unknown {group} {option!r}{did_you_mean(option, options)}; "
                    f"valid {group} options: {', '.join(options)}")
        return f"cannot load config {m.group(1)!r}"
    return " ".join(text.split())[:500]
