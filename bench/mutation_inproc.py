"""Quick in-process check of mutmut's mutants (docs/testing.md, "Quick check").

Runs every mutant mutmut generated for one module (``./mutants/<module>.meta``, written by a
``mutmut run``) against the fixture-free test functions of the given test modules, all in one
process: seconds to minutes instead of mutmut's forked pytest run per mutant. It sees fewer
tests than mutmut (no fixtures, no parametrized tests), so its kill count is a lower bound.

    python bench/mutation_inproc.py ftlab/data/collate.py data.test_packing
    python bench/mutation_inproc.py ftlab/metrics/generation.py test_generation_scores,test_generation_metrics
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


def main(module_path: str, test_modules: list[str]) -> int:
    sys.path[:0] = [str(ROOT / "mutants"), str(ROOT / "tests")]
    os.environ["MUTANT_UNDER_TEST"] = ""
    module = importlib.import_module(module_path.removesuffix(".py").replace("/", "."))
    if not module.__file__.startswith(str(ROOT / "mutants")):
        raise SystemExit(f"{module.__file__} is not mutmut's copy: run `mutmut run` once, without PYTHONPATH")
    tests = []
    for name in test_modules:
        for attr, fn in vars(importlib.import_module(name)).items():
            marks = {m.name for m in getattr(fn, "pytestmark", [])}
            if (attr.startswith("test_") and callable(fn) and not inspect.signature(fn).parameters
                    and not marks & {"parametrize", "slow", "gpu"}):
                tests.append(fn)
    print(f"{len(tests)} test functions")

    def run_all():
        for fn in tests:
            fn()

    run_all()  # the unmutated code passes
    keys = json.loads((ROOT / "mutants" / (module_path + ".meta")).read_text())["exit_code_by_key"]
    signal.signal(signal.SIGALRM, _alarm)
    killed, timeouts, alive = 0, 0, []
    for key in sorted(keys):
        os.environ["MUTANT_UNDER_TEST"] = key
        signal.alarm(20)
        try:
            run_all()
            alive.append(key)
        except _Timeout:
            timeouts += 1
        except BaseException:  # any failure, as pytest would count it
            killed += 1
        finally:
            signal.alarm(0)
    os.environ["MUTANT_UNDER_TEST"] = ""
    print(f"{module_path}: {len(keys)} mutants, {killed} killed, {timeouts} timed out, {len(alive)} alive")
    print("\n".join(alive))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2].split(",")))
