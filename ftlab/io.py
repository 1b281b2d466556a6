"""Files that are whole or absent: every write ftlab makes goes through here.

A reader (another process, a resumed run, a report) sees either the previous version of a
file or directory or the new one, never half of one, even if the writer is killed: the new
content is written under a temporary name in the same directory, flushed to disk (``fsync``),
and renamed into place (a rename within one file system is atomic); the directory entry is
then flushed too, so the rename survives a power loss.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}-tmp-", dir=target.parent))


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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
