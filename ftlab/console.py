"""What the user sees on the terminal: progress lines, one-line errors, quiet libraries.

``fail`` is how every command ends on bad input (``ftlab: error: <message>``, exit status 2);
``capture_output`` copies what a run prints into its ``train.log``;
``quiet_third_party`` is called by the commands' entry points, never on import, so that
importing ftlab as a library changes no warning or logging filter.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Iterator, NoReturn

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
    "`pretrained` model kwarg is not of type",   # lm-eval, handed the model object on purpose
    "Passed an already-initialized model",       # lm-eval, the same
)
_NOISY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                  "lightning.pytorch.trainer.connectors.checkpoint_connector",
                  "lightning.pytorch.trainer.connectors.data_connector",
                  "bitsandbytes.backends.cpu.ops", "lm_eval.models.huggingface")


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


class _Tee:
    """A text stream that writes to ``stream`` and copies to ``log``, leaving out progress-bar
    frames (redrawn with a carriage return or terminal escapes) and the newline that ends one."""

    def __init__(self, stream, log):
        self._stream, self._log, self._in_bar = stream, log, False

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        if "\r" in text or "\x1b[" in text:
            self._in_bar = True
        elif not (self._in_bar and not text.strip()):
            self._in_bar = False
            self._log.write(text)
            self._log.flush()
        return written

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding, ...: the terminal's
        return getattr(self._stream, name)


@contextlib.contextmanager
def capture_output(path: Path) -> Iterator[None]:
    """Append everything printed meanwhile to ``path`` as well as to the terminal: ftlab's own
    lines (data summary, parameter table, results), warnings, the messages of libraries that
    log to the console, and ``ftlab: error:`` lines or the traceback of an error that ends it.
    Only on rank zero (the other processes of a multi-process run print nothing of their own)."""
    if not is_rank_zero():
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        old_out, old_err, old_show = sys.stdout, sys.stderr, warnings.showwarning
        sys.stdout, sys.stderr = _Tee(old_out, log), _Tee(old_err, log)
        tees = {id(old_out): sys.stdout, id(old_err): sys.stderr,
                id(sys.__stdout__): sys.stdout, id(sys.__stderr__): sys.stderr}
        swapped = []  # console handlers of the loggers (Lightning's "GPU available: ...")
        for logger in [logging.getLogger(), *logging.root.manager.loggerDict.values()]:
            for handler in getattr(logger, "handlers", []):
                if type(handler) is logging.StreamHandler and id(handler.stream) in tees:
                    swapped.append((handler, handler.setStream(tees[id(handler.stream)])))

        def show(message, category, filename, lineno, file=None, line=None):
            # Printed even where a caller records warnings (pytest): the log is the record.
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

        warnings.showwarning = show
        try:
            yield
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            log.write(traceback.format_exc())
            raise
        finally:
            for handler, stream in swapped:
                handler.setStream(stream)
            sys.stdout, sys.stderr, warnings.showwarning = old_out, old_err, old_show
