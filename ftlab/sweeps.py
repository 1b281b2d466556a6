"""Sweeps: ``sweep=NAME`` expands ``sweeps/NAME.yaml`` into a Hydra multirun, and a
multirun's override grid expands into one override list per job (for checking every job
before any of them starts).

A sweep file holds ``params`` (one job per combination, Hydra sweep syntax, or an Optuna
search space with ``sweeper: optuna``) and ``overrides`` (fixed for every job); ``method: all``
stands for every registered method. Overrides typed on the command line win over both, so any
sweep can be pointed at another model or data: ``python -m ftlab sweep=methods model=tiny-llama``.

``seeds=N`` (on the command line, or ``seeds: N`` in a sweep file; the command line wins) runs
every configuration of the grid with N seeds: it adds the axis ``seed=b,b+1,...,b+N-1``, where
b is the ``seed`` typed on the command line or, without one, the config's (42). The run's
``seed`` sets the adapter initialisation, the training data order and dropout; the data split is
set by ``data.seed`` alone and stays the same for every seed. ``python -m ftlab.report`` groups the
jobs that differ only in ``seed`` (mean, spread, confidence interval: docs/statistics.md).
"""

from __future__ import annotations

import itertools

from ftlab.errors import ConfigError, did_you_mean
from ftlab.settings import config_dir, first_line, sweeps_dir

MAX_PREFLIGHT_JOBS = 512


def expand_sweep(argv: list[str]) -> list[str]:
    """``sweep=NAME`` -> the multirun that ``sweeps/NAME.yaml`` defines (module docstring)."""
    import yaml

    argv, seeds = _take(argv, "seeds")
    chosen = [a for a in argv if a.split("=", 1)[0] in ("sweep", "+sweep")]
    if not chosen:
        return _with_seeds(argv, seeds)
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
                     "hydra.sweeper.n_jobs=1",
                     f"hydra.sweeper.sampler.seed={spec.get('seed', 0)}"]
    for key, value in {**spec.get("overrides", {}), **spec.get("params", {})}.items():
        if key == "method" and value == "all":
            from ftlab.methods import available as registered_methods  # (reading a report needs no torch)

            value = ",".join(registered_methods())  # the registry is the one list of methods
        if key not in typed:
            expanded.append(f"{key}={_override_value(value)}")
    expanded.append(f"sweep_name={name}")
    if "hydra.sweep.dir" not in typed:
        expanded.append(f"hydra.sweep.dir=multirun/{name}/${{now:%Y-%m-%d_%H-%M-%S}}")
    multirun = [] if {"-m", "--multirun"} & set(rest) else ["-m"]
    if seeds is None and spec.get("seeds") is not None:
        seeds = str(spec["seeds"])
    if seeds is not None and spec.get("sweeper") == "optuna":
        raise ConfigError(f"seeds= repeats every job of a grid; sweep {name!r} is an Optuna search "
                          "(give seed=... per search instead)")
    return _with_seeds(multirun + expanded + rest, seeds)


def _take(argv: list[str], key: str) -> tuple[list[str], str | None]:
    """``argv`` without ``key=VALUE`` (the last one given wins), and that value."""
    found = [a for a in argv if a.split("=", 1)[0].lstrip("+") == key and "=" in a]
    return [a for a in argv if a not in found], (found[-1].split("=", 1)[1] if found else None)


def _with_seeds(argv: list[str], seeds: str | None) -> list[str]:
    """``argv`` with the axis ``seed=b,...,b+N-1`` for ``seeds=N`` (module docstring)."""
    if seeds is None:
        return argv
    try:
        n = int(seeds)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"seeds must be a positive integer (the number of seeds per job), got {seeds!r}")
    rest, base = _take(argv, "seed")
    if base is None:
        import yaml

        base = str((yaml.safe_load((config_dir() / "train.yaml").read_text()) or {}).get("seed", 0))
    try:
        b = int(base)
    except ValueError:
        raise ConfigError(f"seeds={n} counts up from one integer seed; got seed={base} "
                          "(give either seeds=N or a list of seeds)") from None
    multirun = [] if n == 1 or {"-m", "--multirun"} & set(rest) else ["-m"]
    return multirun + rest + [f"seed={','.join(str(b + i) for i in range(n))}"]


def _override_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return "null" if value is None else str(value)


def expand_jobs(overrides: list[str]) -> list[list[str]]:
    """One override list per job: sweeps (``a=1,2``, ``range(...)``) are expanded."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"cannot parse the overrides: {first_line(err)}") from None
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
