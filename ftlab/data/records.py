"""Read raw rows from where ``data.path`` points, each with its location for error messages.

Sources:

- JSON Lines (``.jsonl``, ``.ndjson``) and JSON (``.json``: a list of records, or JSON Lines
  under a ``.json`` name, as the ``datasets`` library also accepts): parsed with the standard
  library, one record at a time, so a bad record is reported with its exact line, and a value
  of the wrong type reaches validation as it is written. (``datasets`` goes through Arrow,
  which unifies a column's type across rows: one ``"output": 3`` among strings fails the whole
  file without a line number, and a missing key becomes ``null``.)
- CSV / TSV and Parquet: read through the Hugging Face ``datasets`` library (pandas / pyarrow
  underneath), into a throw-away cache directory so nothing is left behind. CSV cells are read
  as strings (no type guessing: an answer "42" stays "42"); rows are numbered from 1 after the
  header.
- ``hub:<owner/name>[:split]`` (or a bare ``owner/name`` that is not a local path): a Hugging
  Face dataset, from the local cache or the hub, with ``data.subset`` as its config name.
  Without either, one message says so.
- ``builtin:<name>``: a file or directory shipped in ``ftlab/data/builtin``.
- Plain text (``.txt``, ``.md``, a directory of them, or a glob): documents for ``format=text``.

Every :class:`~ftlab.errors.DataError` names the file and, for a record, where in it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ftlab.errors import DataError

BUILTIN_PREFIX = "builtin:"
HUB_PREFIX = "hub:"
JSON_LINES = (".jsonl", ".ndjson")
TABLES = (".csv", ".tsv", ".parquet", ".pq")
TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
# Python's JSON parser recurses once per level; a record nested deeper than the interpreter's
# recursion limit (about 1000) is no instruction data.
TOO_DEEP = "nested too deeply: arrays or objects inside one another beyond Python's recursion limit"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")


@dataclass(frozen=True)
class Row:
    """One raw record and where it came from (``"line 3"``, ``"row 5"``, ``"record 2"``)."""

    file: str
    where: str
    data: Any

    def error(self, field: str | None, problem: str) -> DataError:
        at = f", field {field!r}" if field else ""
        return DataError(f"{self.file}, {self.where}{at}: {problem}")


def builtin_dir() -> Path:
    return Path(str(resources.files("ftlab.data") / "builtin"))


def resolve_path(path: str) -> Path:
    """``builtin:<name>`` is a file or directory in ``ftlab/data/builtin``; else a local path.

    Raises :class:`DataError` if it does not exist (globs are resolved by :func:`text_files`).
    """
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        found = builtin_dir() / name
        if not found.exists() or not name:
            available = sorted(p.name for p in builtin_dir().iterdir()
                               if not p.name.startswith(("_", ".")) and p.suffix != ".py")
            raise DataError(f"no built-in data {name!r}; built-in: {', '.join(available)}")
        return found
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DataError(f"data file {path} does not exist")
    return resolved


def is_hub_name(path: str) -> bool:
    """``hub:<name>``, or ``owner/name[:split]`` that is not a local path and has no file suffix."""
    if path.startswith(HUB_PREFIX):
        return True
    if path.startswith(BUILTIN_PREFIX) or Path(path).expanduser().exists():
        return False
    if not _HUB_NAME.match(path):
        return False
    last = path.split("/")[-1].split(":")[0]
    return Path(last).suffix.lower() not in (".json", *JSON_LINES, *TABLES, *TEXT_SUFFIXES)


def read_rows(path: str, subset: str | None = None) -> list[Row]:
    """Every raw record of a structured source (JSON, JSON Lines, CSV, TSV, Parquet, hub).

    ``subset``: the config name of a hub dataset (``datasets.load_dataset(name, subset)``);
    refused for a local file, where it could only be a mistake."""
    if is_hub_name(path):
        return _hub_rows(path, subset)
    if subset is not None:
        raise DataError(f"data.subset={subset} names a config of a Hugging Face dataset, but "
                        f"data.path={path} is not one (use hub:<owner>/<name>, or drop data.subset)")
    file = resolve_path(path)
    if file.is_dir():
        raise DataError(f"data.path={path} is a directory; this format reads one file "
                        "(JSON Lines, JSON, CSV, TSV or Parquet)")
    suffix = file.suffix.lower()
    if suffix in (".json", *JSON_LINES):
        return _json_rows(file)
    if suffix in TABLES:
        return _table_rows(file)
    raise DataError(f"{file}: unsupported file type {file.suffix or '(none)'!r}; use .jsonl, .json, "
                    ".csv, .tsv or .parquet")


def _read_text(file: Path) -> str:
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        data = file.read_bytes()
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{file}, line {line}: not valid UTF-8 (byte {err.start})") from None
    text = text.lstrip("\ufeff")  # a byte-order mark, as some editors write
    if not text.strip():
        raise DataError(f"data file {file} is empty")
    return text


def _json_rows(file: Path) -> list[Row]:
    text = _read_text(file)
    if file.suffix.lower() == ".json" and text.lstrip().startswith("["):
        return _json_list_rows(file, text)
    if file.suffix.lower() == ".json":
        if not text.lstrip().startswith("{"):
            raise DataError(f"{file}: expected a JSON list of records (or one JSON object per line)")
        if len([line for line in text.splitlines() if line.strip()]) > 1:
            try:
                json.loads(text)
            except json.JSONDecodeError:
                pass  # JSON Lines under a .json name: parsed line by line below
            else:
                raise DataError(f"{file}: expected a JSON list of records (or one JSON object per "
                                "line), got one JSON object spanning several lines")
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(Row(str(file), f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"{file}, line {lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
        except RecursionError:
            raise DataError(f"{file}, line {lineno}: not valid JSON ({TOO_DEEP})") from None
    return rows


def _json_list_rows(file: Path, text: str) -> list[Row]:
    """A JSON list, decoded element by element so each record knows its line and index."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, text.index("[") + 1).end()
    rows: list[Row] = []
    line, counted = 1, 0  # newlines counted up to text[counted], so the scan stays linear

    try:
        if text[pos:pos + 1] != "]":
            while True:
                obj, end = decoder.raw_decode(text, pos)
                line, counted = line + text.count("\n", counted, pos), pos
                rows.append(Row(str(file), f"record {len(rows) + 1} (line {line})", obj))
                pos = ws.match(text, end).end()
                if text[pos:pos + 1] == ",":
                    pos = ws.match(text, pos + 1).end()
                    continue
                if text[pos:pos + 1] == "]":
                    break
                raise json.JSONDecodeError("expected ',' or ']'", text, pos)
        if text[ws.match(text, pos + 1).end():].strip():
            raise json.JSONDecodeError("extra data after the list", text, pos + 1)
    except json.JSONDecodeError as err:
        raise DataError(f"{file}, line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
    except RecursionError:
        line = text.count("\n", 0, pos) + 1
        raise DataError(f"{file}, record {len(rows) + 1} (line {line}): not valid JSON ({TOO_DEEP})") from None
    if not rows:
        raise DataError(f"data file {file} is empty (an empty JSON list)")
    return rows


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    # CRITICAL: a file datasets cannot read is reported by ftlab, in one line of its own.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


def _table_rows(file: Path) -> list[Row]:
    if file.stat().st_size == 0:
        raise DataError(f"data file {file} is empty")
    datasets = _quiet_datasets()
    suffix = file.suffix.lower()
    kwargs: dict[str, Any] = {}
    if suffix in (".csv", ".tsv"):
        sep = "\t" if suffix == ".tsv" else ","
        header = _read_text(file).splitlines()[0]
        import csv

        columns = next(csv.reader([header], delimiter=sep))
        # Every cell as a string: pandas would turn an answer column of numbers into int64.
        kwargs = dict(sep=sep, keep_default_na=False, encoding="utf-8-sig",
                      features=datasets.Features({c: datasets.Value("string") for c in columns}))
        builder = "csv"
    else:
        builder = "parquet"
    with tempfile.TemporaryDirectory(prefix="ftlab-datasets-") as cache:
        try:
            table = datasets.load_dataset(builder, data_files=str(file), split="train", cache_dir=cache,
                                          keep_in_memory=True, **kwargs)
        except Exception as err:  # noqa: BLE001  pandas/pyarrow raise many types for a bad file
            cause = err.__cause__ or err
            msg = " ".join(str(cause).split())[:300]
            if "corresponds to no data" in msg:  # a header and nothing else
                raise DataError(f"data file {file} is empty (no rows after the header)") from None
            line = re.search(r"line (\d+)", msg)
            at = f", line {line.group(1)}" if line else ""
            raise DataError(f"{file}{at}: cannot read it as {builder.upper()} ({msg})") from None
        records = table.to_list()
    if not records:
        raise DataError(f"data file {file} is empty (no rows after the header)")
    return [Row(str(file), f"row {i}", r) for i, r in enumerate(records, start=1)]


def _hub_rows(path: str, subset: str | None = None) -> list[Row]:
    name = path[len(HUB_PREFIX):] if path.startswith(HUB_PREFIX) else path
    name, _, split = name.partition(":")
    split = split or "train"
    datasets = _quiet_datasets()
    offline = any(os.environ.get(v, "0").lower() in ("1", "true", "yes")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    try:
        # The subset is datasets' config "name" (passed only when given, as a user would).
        table = datasets.load_dataset(name, split=split, **({"name": subset} if subset else {}))
    except Exception as err:  # noqa: BLE001  connection, cache and name errors all end here
        reason = " ".join(str(err).split())[:200]
        where = f"subset {subset!r}, split {split!r}" if subset else f"split {split!r}"
        raise DataError(
            f"data.path={path}: no such local file, and the Hugging Face dataset {name!r} "
            f"({where}) could not be loaded from the local cache"
            + (" with the hub disabled (HF_HUB_OFFLINE=1)" if offline else " or the hub")
            + f" ({type(err).__name__}: {reason}). Use a local file (data.path=/path/to/data.jsonl) "
            "or load the dataset once where the hub is reachable") from None
    source = f"{name}[{subset}/{split}]" if subset else f"{name}[{split}]"
    return [Row(source, f"row {i}", r) for i, r in enumerate(table.to_list(), start=1)]


def text_files(path: str) -> list[Path]:
    """The plain-text documents ``data.path`` names: a file, a directory (its ``*.txt``,
    ``*.md``, ``*.rst`` files, recursively) or a glob, sorted so runs see the same order."""
    if any(ch in path for ch in "*?[") and not path.startswith(BUILTIN_PREFIX):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(path), recursive=True)
                       if Path(p).is_file())
        if not files:
            raise DataError(f"data.path={path} matches no file")
        return files
    root = resolve_path(path)
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise DataError(f"directory {root} has no text files ({', '.join(TEXT_SUFFIXES)})")
    return files


def read_text(file: Path) -> str:
    """A document's text; refuses one that is empty or not UTF-8, naming the line."""
    return _read_text(file)
