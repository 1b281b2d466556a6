"""The command line: ``python -m ftlab [GROUP=OPTION ...] [KEY=VALUE ...] [-m]``.

This is the only module that sees Hydra's ``DictConfig``. Before Hydra starts (and before any
weight loads) it composes the config for every job the command asks for and validates it, so a
typo or an impossible value ends in one line on stderr and exit status 2. It also settles the
run directory up front, so an existing run is never overwritten.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from ftlab.errors import ConfigError, UserError, did_you_mean
from ftlab.hardware import is_rank_zero, register_resolvers

register_resolvers()  # ${ftlab.gpus_per_node:...} in conf/hydra/launcher/slurm.yaml

EXIT_USAGE = 2
# Hydra flags that print something and exit: let Hydra handle them untouched.
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc",
               "--version", "--cfg", "-c", "--resolve", "--package", "-p"}
_VALUE_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                "--experimental-rerun", "--cfg", "-c", "--package", "-p", "--info", "-i",
                "--shell-completion", "-sc"}
MAX_PREFLIGHT_JOBS = 512


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


def expand_sweep(argv: list[str]) -> list[str]:
    """``sweep=NAME`` -> the multirun that ``sweeps/NAME.yaml`` defines.

    A sweep file holds ``params`` (one job per combination, Hydra sweep syntax, or an Optuna
    search space with ``sweeper: optuna``) and ``overrides`` (fixed for every job). Overrides
    typed on the command line win over both, so any sweep can be pointed at another model
    or data: ``python -m ftlab sweep=methods model=tiny-llama``.
    """
    import yaml

    chosen = [a for a in argv if a.split("=", 1)[0] in ("sweep", "+sweep")]
    if not chosen:
        return argv
    name = chosen[-1].split("=", 1)[1]
    available = sorted(p.stem for p in sweeps_dir().glob("*.yaml"))
    path = sweeps_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no sweep named {name!r}{did_you_mean(name, available)}; "
                          f"sweeps in {sweeps_dir()}: {', '.join(available)}")
    spec = yaml.safe_load(path.read_text()) or {}
    rest = [a for a in argv if a not in chosen]
    typed = {a.split("=", 1)[0].lstrip("+~") for a in rest if "=" in a and not a.startswith("-")}
    expanded: list[str] = []
    if spec.get("sweeper") == "optuna":
        expanded += ["hydra/sweeper=optuna",
                     f"hydra.sweeper.direction={spec.get('direction', 'minimize')}",
                     f"hydra.sweeper.n_trials={spec.get('n_trials', 10)}",
                     f"hydra.sweeper.n_jobs=1",
                     f"hydra.sweeper.sampler.seed={spec.get('seed', 0)}"]
    for key, value in {**spec.get("overrides", {}), **spec.get("params", {})}.items():
        if key not in typed:
            expanded.append(f"{key}={_override_value(value)}")
    expanded.append(f"sweep_name={name}")
    if "hydra.sweep.dir" not in typed:
        expanded.append(f"hydra.sweep.dir=multirun/{name}/${{now:%Y-%m-%d_%H-%M-%S}}")
    multirun = [] if {"-m", "--multirun"} & set(rest) else ["-m"]
    return multirun + expanded + rest


def _override_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return "null" if value is None else str(value)


def fail(message: str) -> None:
    print(f"ftlab: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    argv = [_dry_run_shorthand(a) for a in (sys.argv[1:] if argv is None else argv)]
    if any(a.split("=", 1)[0].lstrip("+") == "resume" for a in argv):
        from ftlab.resume import main as resume  # continues a run in its own directory, no Hydra

        return resume(argv)
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    if not flags & _INFO_FLAGS and not flags & {"--config-path", "-cp", "--experimental-rerun"}:
        try:
            argv = preflight(expand_sweep(argv))
        except UserError as err:
            fail(str(err))
        from ftlab import probe  # tests only: records this process's writes (FTLAB_PROBE_DIR)

        for arg in argv[-1:]:
            if arg.startswith("hydra.run.dir="):
                probe.watch_writes(arg.split("=", 1)[1])
    sys.argv = [sys.argv[0]] + argv
    _hydra_entry()


def _dry_run_shorthand(arg: str) -> str:
    """``dry_run=true`` -> ``dry_run.enabled=true``: ``dry_run`` is a node (with
    ``device_memory_gb``), and Hydra cannot set a node and one of its keys in one command."""
    return "dry_run.enabled=" + arg.split("=", 1)[1] if arg.startswith("dry_run=") else arg


def _split(argv: list[str]) -> tuple[list[str], list[str], bool, str, Path]:
    """``(overrides, flags, multirun, config_name, config_dir)``.

    ``-cd DIR -cn NAME`` reruns a saved config: ``-cd <run>/.hydra -cn config``.
    """
    overrides, flags, multirun, name, directory = [], [], False, "train", config_dir()
    it = iter(argv)
    for arg in it:
        if arg in ("-m", "--multirun"):
            multirun = True
            flags.append(arg)
        elif arg.startswith("-"):
            flags.append(arg)
            if arg in _VALUE_FLAGS:
                value = next(it, None)
                if value is not None:
                    flags.append(value)
                    if arg in ("--config-name", "-cn"):
                        name = value
                    if arg in ("--config-dir", "-cd"):
                        directory = Path(value).resolve()
        else:
            overrides.append(arg)
    return overrides, flags, multirun, name, directory


def preflight(argv: list[str]) -> list[str]:
    """Compose and validate every job; return argv with the output directory pinned."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    overrides, flags, multirun, name, directory = _split(argv)
    if not (directory / f"{name}.yaml").is_file():
        raise ConfigError(f"no config {name!r} in {directory}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
        jobs = _expand(overrides, compose, name)
        first = None
        for job in jobs:
            try:
                cfg = compose(name, overrides=job, return_hydra_config=True)
            except Exception as err:  # noqa: BLE001  Hydra raises several types for user errors
                raise ConfigError(_explain_compose_error(err, compose, name, job)) from None
            first = first or cfg
            if not multirun and not is_rank_zero():
                # A process of a multi-process run that rank zero (or torchrun, SLURM) started:
                # it shares rank zero's run directory and writes nothing there, not even
                # Hydra's files (.hydra/, the job log).
                settings = settings_from_config(cfg, str(cfg.hydra.run.dir))
                _check_before_weights(settings)
                pinned = f"hydra.run.dir={cfg.hydra.run.dir}"
                overrides = overrides + ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
            elif not multirun:
                run_dir = _unused_dir(Path(cfg.hydra.run.dir), explicit=_has(job, "hydra.run.dir"))
                settings = settings_from_config(cfg, str(run_dir))
                _check_before_weights(settings)
                pinned = f"hydra.run.dir={run_dir}"
            else:
                # Each job's values are checked when it runs; a bad combination fails that job
                # (recorded in its metrics.json) while the rest of the sweep goes on.
                settings_from_config(cfg, str(cfg.hydra.sweep.dir))
                _check_launcher(cfg)
        if multirun:
            sweep_dir = _unused_dir(Path(first.hydra.sweep.dir), explicit=_has(overrides, "hydra.sweep.dir"))
            pinned = f"hydra.sweep.dir={sweep_dir}"
    GlobalHydra.instance().clear()
    rest = [a for a in overrides if not a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    return flags + rest + [pinned]


def _check_launcher(cfg) -> None:
    """A launcher's resource request that cannot resolve (SLURM needs a number of GPUs)."""
    from omegaconf import OmegaConf

    for key in ("gpus_per_node", "tasks_per_node", "nodes"):
        try:
            OmegaConf.select(cfg, f"hydra.launcher.{key}", throw_on_missing=False)
        except Exception as err:  # noqa: BLE001  OmegaConf wraps the resolver's ConfigError
            message = _first_line(err).replace("ConfigError raised while resolving interpolation: ", "")
            raise ConfigError(f"hydra.launcher.{key}: {message}") from None


def _has(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides)


def _unused_dir(path: Path, explicit: bool) -> Path:
    """The run directory, refusing (explicit) or avoiding (default) one that holds files."""
    if not path.exists() or not any(path.iterdir()):
        return path
    if explicit:
        raise ConfigError(
            f"run directory {path} already exists and is not empty; ftlab never overwrites a run. "
            "Choose another hydra.run.dir (or hydra.sweep.dir), or move the old one away"
        )
    for i in itertools.count(1):
        candidate = path.with_name(f"{path.name}-{i}")
        if not candidate.exists():
            return candidate
    raise AssertionError("unreachable")


def _expand(overrides: list[str], compose, name: str) -> list[list[str]]:
    """One override list per job: sweeps (``a=1,2``, ``range(...)``) are expanded."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"cannot parse the overrides: {_first_line(err)}") from None
    axes: list[list[str]] = []
    for o in parsed:
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # noqa: BLE001  interval(...) etc.: a sweeper samples it later
                values = None
            key = o.get_key_element()
            # A sampled search space (Optuna's interval/tag) is left to the sweeper.
            axes.append([f"{key}={v}" for v in values] if values else [None])
        else:
            axes.append([o.input_line])
    jobs = []
    for combo in itertools.product(*axes):
        jobs.append([c for c in combo if c is not None])
        if len(jobs) >= MAX_PREFLIGHT_JOBS:
            break
    return jobs


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _explain_compose_error(err: Exception, compose, name: str, job: list[str]) -> str:
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
        return f"cannot load config {m.group(1)!r}"
    return " ".join(text.split())[:500]


# --------------------------------------------------------------- config -> typed settings
def settings_from_config(cfg, run_dir: str):
    """Turn the composed ``DictConfig`` into :class:`~ftlab.config.RunSettings`."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ftlab.config import (DataSettings, DryRunSettings, EvalSettings, HardwareSettings,
                              LoggerSettings, LossSettings, ModelSettings, MonitorSettings, OptimizerSettings,
                              RunSettings, SchedulerSettings, build)

    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("hydra", None)  # resolving hydra.* needs the job's runtime; ftlab needs none of it
    try:
        c = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"cannot resolve the config: {_first_line(err)}") from None
    optimizer_cfg = dict(c["optimizer"])
    try:
        # Plain lists, not ListConfig: an optimizer that keeps ``betas`` as given (bitsandbytes')
        # would put an omegaconf object into the checkpoint, which torch.load(weights_only=True)
        # refuses on resume.
        factory = instantiate(cfg.optimizer, _convert_="all")
    except Exception as err:  # noqa: BLE001
        from ftlab.optim import explain_optimizer_error

        raise ConfigError(explain_optimizer_error(optimizer_cfg.get("_target_"), err)) from None
    logger = dict(c["logger"])
    sweep_name = c.get("sweep_name")
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = cfg.hydra if "hydra" in cfg else HydraConfig.get()
        if sweep_name is None and str(hc.mode) == "RunMode.MULTIRUN":
            sweep_name = Path(str(hc.sweep.dir)).name
    except Exception:  # noqa: BLE001
        pass
    return RunSettings(
        run_dir=run_dir,
        method=dict(c["method"]),
        model=build(ModelSettings, c["model"], "model"),
        data=build(DataSettings, c["data"], "data"),
        optimizer=OptimizerSettings(factory=factory, lr=optimizer_cfg.get("lr"),
                                    weight_decay=optimizer_cfg.get("weight_decay", 0.0)),
        scheduler=build(SchedulerSettings, c["scheduler"], "scheduler"),
        hardware=build(HardwareSettings, c["hardware"], "hardware"),
        logger=build(LoggerSettings, logger, "logger"),
        eval=build(EvalSettings, c["eval"], "eval"),
        trainer=dict(c["trainer"]),
        seed=c["seed"],
        dry_run=build(DryRunSettings, c["dry_run"] if isinstance(c["dry_run"], dict)
                      else {"enabled": c["dry_run"]}, "dry_run"),
        checkpoint_every_n_steps=c["checkpoint"]["every_n_steps"],
        monitor=build(MonitorSettings, c["monitor"], "monitor"),
        loss=build(LossSettings, c.get("loss") or {}, "loss"),  # absent from runs saved before it
        sweep_name=sweep_name,
    )


def _check_before_weights(settings) -> None:
    from ftlab.data import InstructionDataModule
    from ftlab.run import preflight as run_preflight

    run_preflight(settings)
    if not settings.dry_run.enabled:  # a dry run reads no data
        InstructionDataModule(settings.data, tokenizer=None).check_files()


# ----------------------------------------------------------------------------- the job
def _task(cfg) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from ftlab.run import train, write_json

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        settings = settings_from_config(cfg, str(run_dir))
        raw = OmegaConf.to_container(cfg, resolve=False)
        resolved = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
        if is_rank_zero():
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
        metrics = train(settings, config=resolved)
        if settings.dry_run.enabled:
            return math.nan  # a plan (plan.json) has no objective
        objective = metrics.get(cfg.get("objective") or "val_loss")
        if objective is None:
            raise ConfigError(f"objective={cfg.get('objective')!r} is not a key of metrics.json; "
                              f"numeric keys: {', '.join(k for k, v in metrics.items() if isinstance(v, (int, float)))}")
        return float(objective)
    except UserError as err:
        if not multirun:
            fail(str(err))
        print(f"ftlab: job {hc.job.num} failed: {err}", file=sys.stderr, flush=True)
        # A run that failed while training (a NaN loss) already recorded where: keep that.
        from ftlab.resume import read_metrics

        write_json(run_dir / "metrics.json", {**read_metrics(run_dir), "status": "failed",
                                              "error": str(err), "overrides": list(hc.overrides.task)})
    except Exception as err:  # noqa: BLE001
        if not multirun:
            raise
        (run_dir / "error.log").write_text(traceback.format_exc())
        print(f"ftlab: job {hc.job.num} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        write_json(run_dir / "metrics.json", {"status": "failed", "error": f"{type(err).__name__}: {err}",
                                              "overrides": list(hc.overrides.task)})
    return math.nan


def _hydra_entry() -> None:
    import hydra

    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(_task)()


if __name__ == "__main__":
    main()
