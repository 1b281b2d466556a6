"""The ``ftlab`` command and its subcommands (the console script; also ``python -m ftlab``).

    ftlab train [GROUP=OPTION ...] [KEY=VALUE ...] [-m]   fine-tune (Hydra overrides; -m: a sweep)
    ftlab plan  [overrides]                                plan a run without weights (dry_run=true)
    ftlab eval RUN [--data FILE] [--base] [--best] ...     score a finished run
    ftlab export RUN --merge OUT | --adapter OUT           a merged model or the adapter alone
    ftlab report DIR [--baseline M] [--wandb] ...          table and plots for the jobs under DIR

``ftlab`` alone (or ``ftlab --help``) prints this list. Anything else whose first word is an override (``KEY=VALUE``)
or an option (``-m``, ``-cd DIR``) is ``ftlab train``, so
``ftlab method=vera`` and ``python -m ftlab method=vera`` stay what they were; ``python -m ftlab``
alone still runs the default job and ``python -m ftlab --help`` still shows Hydra's help (the
config groups, as ``ftlab train --help`` does). Each subcommand is the module's own entry point, which keeps
working on its own (``python -m ftlab.eval`` etc.).
"""

from __future__ import annotations

import difflib
import importlib
import sys

from ftlab.console import fail

# name -> (one-line summary, what follows the name)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("fine-tune: one run, or a sweep with -m (Hydra overrides, e.g. method=lora method.r=16)",
              "[GROUP=OPTION ...] [KEY=VALUE ...] [-m]"),
    "plan": ("plan a run without loading weights: parameters and memory per device (= train dry_run=true)",
             "[GROUP=OPTION ...] [KEY=VALUE ...] [-m]"),
    "eval": ("score a finished run (or its untrained base) on held-out or test data", "RUN [options]"),
    "export": ("write a finished run's model with the adapter merged, or the adapter alone",
               "RUN --merge OUT | --adapter OUT"),
    "report": ("compare the runs under a directory: tables, statistics over seeds, plots", "DIR [options]"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["ftlab: fine-tune language models and compare fine-tuning methods", "",
             "Usage: ftlab COMMAND [ARGS ...]", "", "Commands:"]
    lines += [f"  {name:{width}}  {summary}" for name, (summary, _) in COMMANDS.items()]
    lines += ["", "ftlab COMMAND --help shows a command's arguments (ftlab train --help: every config group",
              "and option). Examples:",
              "  ftlab train model=tiny-llama trainer.max_steps=20     # a 20-second smoke run",
              "  ftlab train -m method=lora,dora,vera                  # a sweep (Hydra multirun)",
              "  ftlab plan model=llama2-7b method=qlora               # memory of a 7B run, no weights",
              "  ftlab eval outputs/<date>/<run> --best",
              "  ftlab report multirun/<date>/<time>",
              "`python -m ftlab ARGS` is `ftlab train ARGS`; overrides without a command train too."]
    return "\n".join(lines)


# name -> (the entry-point module that runs it, arguments it adds). Each module is loaded by
# name when its command runs, as ``python -m ftlab.<module>`` would: this dispatcher is not a
# layer above them, and the other commands' imports (torch, Lightning) stay unpaid.
_RUNNERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": ("cli", ()), "plan": ("cli", ("dry_run.enabled=true",)), "eval": ("eval", ()),
    "export": ("export", ()), "report": ("report", ())}


def _run(command: str, argv: list[str]) -> None:
    module, extra = _RUNNERS[command]
    importlib.import_module(f"ftlab.{module}").main([*argv, *extra])


def main(argv: list[str] | None = None, bare: str = "help") -> None:
    """The ``ftlab`` console script. ``bare``: what no arguments at all mean, ``help`` (this
    list) for ``ftlab`` and ``train`` (the default job) for ``python -m ftlab``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        if bare == "help":
            print(usage())
            return
        return _run("train", [])
    first = argv[0]
    if first in ("-h", "--help", "help") and bare == "help":  # python -m ftlab --help: Hydra's, as before
        print(usage())
        return
    if first in _RUNNERS:
        return _run(first, argv[1:])
    if "=" in first or first.startswith("-"):
        return _run("train", argv)  # Hydra overrides or options: train, as python -m ftlab always did
    close = difflib.get_close_matches(first, list(COMMANDS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    fail(f"unknown command {first!r}{hint}; commands: {', '.join(COMMANDS)} "
         f"(ftlab --help); overrides are KEY=VALUE")


def module_main() -> None:
    """``python -m ftlab``: the same commands, and no arguments run the default job."""
    main(bare="train")

