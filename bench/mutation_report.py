"""Per-module table of a mutmut run (bench/mutation.sh, docs/testing.md).

Reads mutmut's result files (``mutants/<path>.meta``) and the equivalent mutants listed in
docs/testing.md (every backquoted mutant name in its "Equivalent mutants" section), and prints
for each module: mutants, killed (a test failed, or the mutant hung and timed out), survived,
of those explained as equivalent, and the score ``killed / (mutants - equivalent)``.

    python bench/mutation_report.py            # markdown table
    python bench/mutation_report.py --list     # also every mutant that was not killed
    python bench/mutation_report.py --survivors loss   # names of loss.py's mutants not killed
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module label -> (mutated file, mutant-name globs); the same selection as bench/mutation.sh.
_MODULE_METRICS = ("training_step", "_weight_by_tokens", "on_before_optimizer_step", "validation_step",
                   "on_validation_epoch_end", "throughput")
MODULES = {
    # label: (file, globs); bench/mutation.sh's short names are the file names without .py
    "methods/native/common.py": ("ftlab/methods/native/common.py", ["*"]),
    "methods/native/lora.py": ("ftlab/methods/native/lora.py", ["*"]),
    "methods/native/lora_fa.py": ("ftlab/methods/native/lora_fa.py", ["*"]),
    "methods/native/vera.py": ("ftlab/methods/native/vera.py", ["*"]),
    "methods/native/delta_lora.py": ("ftlab/methods/native/delta_lora.py", ["*"]),
    "methods/native/adapter.py": ("ftlab/methods/native/adapter.py", ["*"]),
    "data/collate.py": ("ftlab/data/collate.py", ["*"]),
    "training/loss.py": ("ftlab/training/loss.py", ["*"]),
    "training/module.py (loss, metrics)": ("ftlab/training/module.py",
                                           [f"*ǁ{name}__mutmut_*" for name in _MODULE_METRICS]),
    "metrics/generation.py": ("ftlab/metrics/generation.py", ["*"]),
    "planning/counts.py": ("ftlab/planning/counts.py", ["*"]),
}
KILLED = {1, 3, 36, 24, -24, 152, 255}  # a failing test (3: pytest internal error), or a timeout
SURVIVED = {0, 5, 33}  # the tests passed, or no selected test runs the mutated function


def equivalent_mutants(doc: Path) -> set[str]:
    """Mutant names quoted in the "Equivalent mutants" section of docs/testing.md."""
    if not doc.is_file():
        return set()
    text = doc.read_text(encoding="utf-8")
    match = re.search(r"^## Equivalent mutants\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    return set(re.findall(r"`([\w.ǁ]+__mutmut_\d+)`", match.group(1))) if match else set()


def results(root: Path) -> dict[str, dict[str, int | None]]:
    """``{module label: {mutant name: exit code}}`` for the mutants the check selects."""
    out = {}
    for label, (path, globs) in MODULES.items():
        meta = root / "mutants" / (path + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.is_file() else {}
        out[label] = {k: v for k, v in codes.items() if any(fnmatch.fnmatch(k, g) for g in globs)}
    return out


def table(by_module: dict[str, dict[str, int | None]], equivalent: set[str]) -> list[str]:
    lines = ["| module | mutants | killed | survived | equivalent | not run | score |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    total = Counter()
    for label, codes in by_module.items():
        c = Counter()
        for name, code in codes.items():
            c["mutants"] += 1
            if code in KILLED:
                c["killed"] += 1
            elif code in SURVIVED:
                c["survived"] += 1
                c["equivalent"] += name in equivalent
            else:  # not checked yet, interrupted, suspicious, segfault
                c["not run"] += 1
        total.update(c)
        lines.append(_row(label, c))
    lines.append(_row("**all**", total))
    return lines


def _row(label: str, c: Counter) -> str:
    checked = c["mutants"] - c["not run"] - c["equivalent"]
    score = f"{100 * c['killed'] / checked:.1f}%" if checked else "-"
    return (f"| {label} | {c['mutants']} | {c['killed']} | {c['survived']} | {c['equivalent']} | "
            f"{c['not run']} | {score} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the mutants that were not killed")
    parser.add_argument("--survivors", metavar="NAME", help="print the names of a module's mutants not killed "
                        "(NAME as in bench/mutation.sh: collate, loss, module, ...)")
    parser.add_argument("--unchecked", metavar="NAME", help="print the names of a module's mutants not checked yet")
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    by_module = results(args.root)
    if args.survivors or args.unchecked:
        stem = args.survivors or args.unchecked
        label = next(k for k, (path, _) in MODULES.items() if Path(path).stem == stem)
        wanted = (lambda v: v not in KILLED) if args.survivors else (lambda v: v is None)
        for name in sorted(k for k, v in by_module[label].items() if wanted(v)):
            print(name)
        return 0
    equivalent = equivalent_mutants(args.root / "docs" / "testing.md")
    print("\n".join(table(by_module, equivalent)))
    print("\nscore = killed / (mutants - equivalent - not run); killed includes timeouts")
    if args.list:
        for codes in by_module.values():
            for name, code in sorted(codes.items()):
                if code not in KILLED:
                    tag = "equivalent" if name in equivalent else {0: "survived", 5: "no tests", 33: "no tests",
                                                                  None: "not run"}.get(code, f"exit {code}")
                    print(f"{tag:10} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
