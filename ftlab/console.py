"""What the user sees on the terminal: progress lines, one-line errors, quiet libraries.

``fail`` is how every command ends on bad input (``ftlab: error: <message>``, exit status 2);
``quiet_third_party`` is called by the commands' entry points, never on import, so that
importing ftlab as a library changes no warning or logging filter.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import NoReturn

EXIT_USAGE = 2


def is_rank_zero() -> bool:
    """Whether this process is global rank 0, from the launcher's environment.

    Lightning's own launcher sets ``LOCAL_RANK``/``NODE_RANK`` in the processes it starts,
    torchrun sets ``RANK``, SLURM ``SLURM_PROCID``; a process none of them started is rank 0.
    Usable before any Trainer exists (the CLI decides here whether it may write)."""
    for var in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"):
        value = os.environ.get(var)
        if value not in (None, "", "0"):
            return False
    return True


def say(msg: str = "") -> None:
    """Print one line on rank zero (the other processes of a multi-process run would repeat it)."""
    if is_rank_zero():
        print(msg, flush=True)


def fail(message: str, status: int = EXIT_USAGE) -> NoReturn:
    """End the command on bad input: one line on stderr, exit status 2 (or ``status``)."""
    print(f"ftlab: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


class CommandParser(argparse.ArgumentParser):
    """``argparse`` for ftlab's commands: a usage error is one ``ftlab: error:`` line, exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message}")


# Known, harmless third-party messages (an advertisement, a deprecation inside a library, a
# kernel bitsandbytes tries to fetch from a hub). Warnings about the user's own setup pass.
_DROP_LOG_SUBSTRINGS = (
    "Tip: For seamless",                         # Lightning's litlogger advertisement
    "`weights_only` was not set",                # Lightning, on every save_checkpoint
    "was configured so 100% of the batches",     # Lightning restating limit_val_batches=1.0
    "Failed to load CPU gemm_4bit_forward",      # bitsandbytes: optional hub kernel
)
_NOISY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                  "lightning.pytorch.trainer.connectors.checkpoint_connector",
                  "lightning.pytorch.trainer.connectors.data_connector",
                  "bitsandbytes.backends.cpu.ops")


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(s in msg for s in _DROP_LOG_SUBSTRINGS)


def quiet_third_party() -> None:
    """Silence the messages above; for the commands' entry points (changes global filters)."""
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise())
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")
    warnings.filterwarnings("ignore", message=".*does not have many workers which may be a bottleneck")
    warnings.filterwarnings("ignore",
                            message=".*The number of training batches .* is smaller than the logging interval")
