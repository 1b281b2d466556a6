"""Files that are whole or absent: every write ftlab makes goes through here.

A reader (another process, a resumed run, a report) sees either the previous version of a
file or directory or the new one, never half of one, even if the writer is killed: the new
content is written under a temporary name in the same directory, flushed to disk (``fsync``),
and renamed into place (a rename within one file system is atomic); the directory entry is
then flushed too, so the rename survives a power loss.

A write that fails (disk full, quota, read-only or unwritable directory) removes its temporary
file and raises :class:`WriteError`, which names the path and the reason in one line; what was
at ``path`` before stays as it was. A process killed mid-write leaves its temporary file
(``.<name>.tmp-*``, ``.<name>-tmp-*``, ``.<name>-old-*``) behind: :func:`remove_orphans`
clears them when the run continues.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from ftlab.errors import UserError

# Reasons a write fails that the user can act on (space, quota, permissions, read-only mount).
_ENVIRONMENT = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EFBIG: "file too large",
                errno.EIO: "input/output error"}
WRITE_ERRNOS = frozenset(_ENVIRONMENT)


class WriteError(UserError):
    """A file or directory could not be written: the path and the reason, in one line.

    Before training it is bad input like any other (exit status 2); during or after training
    the command exits with :data:`EXIT_WRITE` (74, ``EX_IOERR``), so a script can tell "free
    space and resume" from "fix the command"."""

    def __init__(self, path: str | Path, err: OSError):
        reason = _ENVIRONMENT.get(err.errno) or (err.strerror or str(err)).lower()
        super().__init__(f"cannot write {path}: {reason} ({errno.errorcode.get(err.errno, err.errno)}); "
                         "what was there before is unchanged")
        self.path, self.errno = Path(path), err.errno
        self.mid_run = False  # set once training has started (ftlab.training.faults.write_failures)
        self.last_checkpoint: Path | None = None


EXIT_WRITE = 74
# The names of this module's temporary files and directories (tempfile adds 8 characters).
_ORPHAN = re.compile(r"^\..+(\.tmp-|-tmp-|-old-)[a-z0-9_]{8}$")


def _failed_write(path: Path, err: BaseException) -> BaseException:
    """``err`` as a :class:`WriteError` when it is an OSError of the environment."""
    if isinstance(err, WriteError) or not isinstance(err, OSError) or err.errno not in WRITE_ERRNOS:
        return err
    return WriteError(path, err)


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename into it) durable; a no-op where the file
    system does not allow opening directories."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None], mode: int = 0o644) -> None:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync it, rename it to ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as err:
        raise _failed_write(path, err) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        failed = _failed_write(path, err)
        if failed is err:
            raise
        raise failed from None
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON (values JSON cannot hold are written with ``str``)."""
    write_text(path, json.dumps(data, indent=2, default=str))


def read_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` if there is none or it cannot be read (a file
    from an interrupted older version, or edited by hand, is treated as absent)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write` (checkpoints)."""
    import torch

    atomic_write(path, lambda fh: torch.save(obj, fh))


def scratch_dir(target: str | Path) -> Path:
    """A fresh temporary directory beside ``target`` (same file system: the rename is atomic)."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}-tmp-", dir=target.parent))
    except OSError as err:
        raise _failed_write(target, err) from None


def replace_directory(tmp: Path, target: Path) -> None:
    """Move the finished directory ``tmp`` to ``target``, replacing what is there.

    A directory cannot be swapped atomically for a non-empty one, so an old ``target`` is first
    renamed aside (a reader that opens it by name then misses it, rather than reading a
    directory that is being deleted) and removed under its private name."""
    os.chmod(tmp, 0o755)
    aside = None
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        os.replace(target, aside / target.name)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def atomic_directory(target: str | Path, fill: Callable[[Path], None], *, replace: bool = True) -> Path:
    """Fill a temporary directory beside ``target`` with ``fill(tmp)``, then rename it to
    ``target`` (:func:`replace_directory`); ``replace=False``: an existing non-empty ``target``
    is an error, raised before anything is moved."""
    target = Path(target)
    tmp = scratch_dir(target)
    try:
        fill(tmp)
        if not replace and target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise FileExistsError(f"{target} already exists and is not empty")
        replace_directory(tmp, target)
    except OSError as err:  # a library's write into tmp, or the renames
        failed = _failed_write(target, err)
        if failed is err:
            raise
        raise failed from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def remove_orphans(directory: str | Path) -> list[Path]:
    """Remove what writers killed mid-write left in ``directory`` and its subdirectories (a
    run's own directory: call it only where no other process writes there). Returns them."""
    found = [p for p in Path(directory).rglob(".*") if _ORPHAN.match(p.name)]
    removed = []
    for p in sorted(found, key=lambda q: len(q.parts)):
        if not p.exists() and not p.is_symlink():
            continue  # inside one removed before
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def check_writable(directory: str | Path) -> None:
    """Raise :class:`WriteError` unless a file can be written in ``directory``: an output
    directory that cannot be written is refused before any work. Creates the directory and a
    file to find out, and removes what it created."""
    directory = Path(directory)
    created = next((d for d in reversed([directory, *directory.parents]) if not d.exists()), None)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ftlab-write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:  # whatever the reason (a file in the way, permissions, space)
        raise WriteError(directory, err) from None
    finally:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
