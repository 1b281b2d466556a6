"""The command line: ``python -m ftlab [GROUP=OPTION ...] [KEY=VALUE ...] [-m]``.

This is the entry point that sees Hydra. Before Hydra starts (and before any weight loads)
it composes the config for every job the command asks for and validates it, so a typo or an
impossible value ends in one line on stderr and exit status 2. It also settles the run
directory up front, so an existing run is never overwritten. What a job prints is also written to
its directory's ``train.log``. ``resume=...`` continues a run
in its own directory instead (:mod:`ftlab.resume`). A sweep run again into its own directory
(an explicit ``hydra.sweep.dir`` that holds Hydra's ``multirun.yaml``) continues: each job that
completed there with the same resolved config returns its recorded objective without training.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import traceback
from pathlib import Path

from ftlab.console import capture_output, fail, is_rank_zero, quiet_third_party, say
from ftlab.errors import ConfigError, UserError
from ftlab.io import EXIT_WRITE, WriteError, check_writable, write_json, write_text
from ftlab.rundir import TRAIN_LOG, read_metrics
from ftlab.settings import config_dir, explain_compose_error, first_line, resolved, settings_from_config
from ftlab.sweeps import expand_jobs, expand_sweep
from ftlab.training.checkpoints import checkpoints
from ftlab.training.hardware import register_resolvers
from ftlab.training.preemption import record_job, requeued_run

# Hydra flags that print something and exit: let Hydra handle them untouched.
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc",
               "--version", "--cfg", "-c", "--resolve", "--package", "-p"}
_VALUE_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                "--experimental-rerun", "--cfg", "-c", "--package", "-p", "--info", "-i",
                "--shell-completion", "-sc"}


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    register_resolvers()  # ${ftlab.gpus_per_node:...} in conf/hydra/launcher/slurm.yaml
    argv = [_dry_run_shorthand(a) for a in (sys.argv[1:] if argv is None else argv)]
    if any(a.split("=", 1)[0].lstrip("+") == "resume" for a in argv):
        return resume(argv)  # continues a run in its own directory, no Hydra
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    if not flags & _INFO_FLAGS and not flags & {"--config-path", "-cp", "--experimental-rerun"}:
        try:
            expanded = expand_sweep(argv)
            single = not {"-m", "--multirun"} & set(expanded)
            # A SLURM job started again after a requeue: the same command continues its run.
            again = requeued_run(argv, _run_dir_arg(argv)) if single else None
            if again is not None and checkpoints(again):
                say(f"ftlab: SLURM job started again: continuing {again}")
                return resume([*argv, f"resume={again}"])
            command, argv = argv, preflight(expanded, reuse=again)
            if single and _run_dir_arg(argv) is not None:
                record_job(_run_dir_arg(argv), command)
        except UserError as err:
            fail(str(err))
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


def _run_dir_arg(argv: list[str]) -> Path | None:
    """The last ``hydra.run.dir=`` of a command line, if any."""
    given = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0].lstrip("+~") == "hydra.run.dir"]
    return Path(given[-1]) if given else None


def preflight(argv: list[str], reuse: Path | None = None) -> list[str]:
    """Compose and validate every job; return argv with the output directory pinned
    (``reuse``: a run directory this SLURM job started before its requeue, without checkpoints,
    which it starts again)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides, flags, multirun, name, directory = _split(argv)
    if not (directory / f"{name}.yaml").is_file():
        raise ConfigError(f"no config {name!r} in {directory}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
        jobs = expand_jobs(overrides)
        first = None
        for job in jobs:
            try:
                cfg = compose(name, overrides=job, return_hydra_config=True)
            except Exception as err:  # noqa: BLE001  Hydra raises several types for user errors
                raise ConfigError(explain_compose_error(err, compose, name, job)) from None
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
                run_dir = Path(cfg.hydra.run.dir)
                if reuse is None or run_dir.resolve() != reuse.resolve():
                    run_dir = _unused_dir(run_dir, explicit=_has(job, "hydra.run.dir"))
                settings = settings_from_config(cfg, str(run_dir))
                _check_before_weights(settings)
                check_writable(run_dir)  # before Hydra creates it (its error would be a traceback)
                pinned = f"hydra.run.dir={run_dir}"
            else:
                # Each job's values are checked when it runs; a bad combination fails that job
                # (recorded in its metrics.json) while the rest of the sweep goes on.
                settings_from_config(cfg, str(cfg.hydra.sweep.dir))
                _check_launcher(cfg)
        if multirun:
            sweep_dir = Path(first.hydra.sweep.dir)
            if _has(overrides, "hydra.sweep.dir") and (sweep_dir / "multirun.yaml").is_file():
                say(f"ftlab: continuing the sweep in {sweep_dir}: jobs already completed are skipped")
            else:
                sweep_dir = _unused_dir(sweep_dir, explicit=_has(overrides, "hydra.sweep.dir"))
            check_writable(sweep_dir)
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
            message = first_line(err).replace("ConfigError raised while resolving interpolation: ", "")
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

    from ftlab.models.reuse import asked_for, keep_bases

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    # Jobs one after another in this process: each may start from a copy of the base loaded once.
    keep_bases(multirun and asked_for() and hc.launcher.get("_target_", "").endswith(".BasicLauncher"))
    if multirun and read_metrics(run_dir).get("status") == "completed":
        return _completed_job(cfg, run_dir, hc.job.num)
    with capture_output(run_dir / TRAIN_LOG):  # what the job prints, also in its directory
        return _job(cfg, hc, run_dir, multirun)


def _job(cfg, hc, run_dir: Path, multirun: bool) -> float:
    from omegaconf import OmegaConf

    from ftlab.run import train

    try:
        settings = settings_from_config(cfg, str(run_dir))
        config = resolved(cfg)
        if is_rank_zero():
            write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
        metrics = train(settings, config=config)
        if settings.dry_run.enabled:
            return math.nan  # a plan (plan.json) has no objective
        objective = metrics.get(cfg.get("objective") or "val_loss")
        if objective is None and metrics.get("validation") == "off":
            return math.nan  # nothing held out to score; metrics.json says "validation": "off"
        if objective is None:
            numeric = ", ".join(k for k, v in metrics.items() if isinstance(v, (int, float)))
            raise ConfigError(f"objective={cfg.get('objective')!r} is not a key of metrics.json; "
                              f"numeric keys: {numeric}")
        return float(objective)
    except UserError as err:
        if not multirun:
            _fail(err, run_dir)
        print(f"ftlab: job {hc.job.num} failed: {err}", file=sys.stderr, flush=True)
        # A run that failed while training (a NaN loss) already recorded where: keep that.
        write_json(run_dir / "metrics.json", {**read_metrics(run_dir), "status": "failed",
                                              "error": str(err), "overrides": list(hc.overrides.task)})
    except Exception as err:  # noqa: BLE001
        if not multirun:
            raise
        write_text(run_dir / "error.log", traceback.format_exc())
        print(f"ftlab: job {hc.job.num} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        write_json(run_dir / "metrics.json", {"status": "failed", "error": f"{type(err).__name__}: {err}",
                                              "overrides": list(hc.overrides.task)})
    return math.nan


def _completed_job(cfg, run_dir: Path, num: int) -> float:
    """A job of a sweep run again (the same ``hydra.sweep.dir``) that completed before: its
    recorded objective, without training, when its config.yaml is the one asked for now; a job
    directory that holds another configuration is left as it is (the job is not run)."""
    from omegaconf import OmegaConf

    try:
        wanted = OmegaConf.to_yaml(OmegaConf.create(resolved(cfg)))
        recorded = (run_dir / "config.yaml").read_text()
    except Exception as err:  # noqa: BLE001  a config that does not resolve, a missing file
        wanted, recorded = None, first_line(err)
    if wanted != recorded:
        print(f"ftlab: job {num}: {run_dir} holds a completed job with another configuration; "
              "left as it is and not run (use a new hydra.sweep.dir)", file=sys.stderr, flush=True)
        return math.nan
    metrics = read_metrics(run_dir)
    say(f"ftlab: job {num} already completed in {run_dir}; skipped")
    value = metrics.get(cfg.get("objective") or "val_loss")
    return float(value) if isinstance(value, (int, float)) else math.nan


# ---------------------------------------------------------------------------- resume=...
def resume(argv: list[str]) -> None:
    """``python -m ftlab resume=RUN|CKPT|last [allowed overrides]``: continue a run exactly."""
    from ftlab.resume import resume_point
    from ftlab.run import train

    try:
        settings, config, point = resume_point(*_parse_resume(argv))
    except UserError as err:
        fail(str(err))
    with capture_output(point.run_dir / TRAIN_LOG):  # continues the run's log
        say(f"ftlab: resuming {point.run_dir} from {point.checkpoint.name} (step {point.step})")
        try:
            train(settings, config=config, resume=point)
        except UserError as err:
            _fail(err, point.run_dir)


def _fail(err: UserError, run_dir: Path) -> None:
    """One line and exit 2; a write that failed once training had started exits 74 and says
    where the run can continue from."""
    if isinstance(err, WriteError) and err.mid_run:
        where = (f"the last checkpoint ({err.last_checkpoint}) is intact; free space (or fix the "
                 f"permissions) and continue with: python -m ftlab resume={run_dir}"
                 if err.last_checkpoint else "the run had written no checkpoint yet; start it again")
        fail(f"{err}. The run stopped; {where}", status=EXIT_WRITE)
    fail(str(err))


def _parse_resume(argv: list[str]) -> tuple[str, Path | None, list[tuple[str, str, str]]]:
    value, run_dir, overrides = None, None, []
    it = iter(argv)
    for arg in it:
        if arg in ("-cd", "--config-dir"):
            run_dir = Path(next(it, ""))
        elif arg in ("-cn", "--config-name"):
            name = next(it, "")
            if name != "config":
                raise UserError(f"resume reads the run's config.yaml; -cn {name} does not apply")
        elif arg in ("-m", "--multirun"):
            raise UserError("resume continues one run; it cannot be combined with -m (a sweep)")
        elif arg.startswith("-"):
            raise UserError(f"{arg} cannot be combined with resume=")
        elif "=" not in arg:
            raise UserError(f"cannot parse {arg!r}: expected KEY=VALUE")
        else:
            key, text = arg.split("=", 1)
            key = key.lstrip("+~")
            if key == "resume":
                value = text
            elif key == "hydra.run.dir":
                run_dir = Path(text)
            else:  # (logger=... is a group choice: ftlab.resume composes it)
                overrides.append((key, text, arg))
    if not value:
        raise UserError("resume= needs a run directory, a checkpoint file or 'last'")
    return value, run_dir, overrides


def _hydra_entry() -> None:
    import hydra

    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(_task)()


if __name__ == "__main__":
    main()
