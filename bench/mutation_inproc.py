"""Quick in-process check of mutmut's mutants (docs/testing.md, "Quick check").

Runs every mutant mutmut generated for one module (``./mutants/<module>.meta``, written by a
``mutmut run``, or by ``--generate``) against the test functions of the given test modules, all
in one process: seconds to minutes instead of mutmut's forked pytest run per mutant.

Which tests: every ``test_*`` function of the modules, parametrized ones once per case, whose
only fixture is ``tmp_path`` (a fresh temporary folder per call); not ``slow`` or ``gpu`` ones.
Each test runs after ``torch.manual_seed(0)`` (the autouse fixture of tests/methods). A first
pass records, through mutmut's trampolines (``MUTANT_UNDER_TEST=stats``), which functions each
test calls; each mutant then runs only the tests that call its function, fastest first, up to
the first failure, as mutmut does. A mutant no test reaches survives ("no tests"). A test call
that takes longer than 10 times its clean time plus 5 s counts as a kill (a timeout). Tests
with other fixtures are left out, so the kill count is a lower bound on mutmut's.

    python bench/mutation_inproc.py ftlab/data/collate.py data.test_packing
    python bench/mutation_inproc.py ftlab/metrics/generation.py test_generation_scores,test_generation_metrics
    python bench/mutation_inproc.py --generate ftlab/methods/native/lora.py methods.test_native_lora
    python bench/mutation_inproc.py --only NAME,NAME ...   # some mutants (e.g. survivors, after new tests)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


def generate() -> None:
    """mutmut's mutant generation step (of ``mutmut run``) alone: (re)writes ./mutants for the
    modules whose source is newer than their mutated copy."""
    os.chdir(ROOT)
    from mutmut.__main__ import copy_also_copy_files, copy_src_dir, create_mutants, setup_source_paths
    from mutmut.mutation.trampoline import set_mutant_under_test

    set_mutant_under_test("mutant_generation")
    copy_src_dir()
    copy_also_copy_files()
    setup_source_paths()
    print(create_mutants(1))


def collect(test_modules: list[str]) -> tuple[list[tuple[str, object]], list[str]]:
    """``[(test id, zero-argument callable)]`` and the ids of the tests left out."""
    calls, left_out = [], []
    for name in test_modules:
        for attr, fn in vars(importlib.import_module(name)).items():
            if not (attr.startswith("test_") and inspect.isfunction(fn)):
                continue
            marks = getattr(fn, "pytestmark", [])
            if {m.name for m in marks} & {"slow", "gpu", "skip", "usefixtures"}:
                left_out.append(f"{name}::{attr}")
                continue
            cases = [({}, "")]
            for mark in marks:
                if mark.name != "parametrize":
                    continue
                argnames, argvalues = mark.args[0], mark.args[1]
                argnames = [a.strip() for a in argnames.split(",")] if isinstance(argnames, str) else list(argnames)
                new = []
                for values in argvalues:
                    values = getattr(values, "values", values)  # pytest.param(...)
                    values = values if len(argnames) > 1 else (values,)
                    new.append((dict(zip(argnames, values)), "-".join(map(str, values))))
                cases = [({**a, **b}, "-".join(filter(None, (ia, ib))))
                         for (a, ia), (b, ib) in itertools.product(cases, new)]
            params = set(inspect.signature(fn).parameters)
            for kwargs, ident in cases:
                rest = params - set(kwargs)
                test_id = f"{name}::{attr}" + (f"[{ident}]" if ident else "")
                if rest - {"tmp_path"}:
                    left_out.append(test_id)
                    continue
                calls.append((test_id, _call(fn, kwargs, "tmp_path" in rest)))
    return calls, left_out


def _call(fn, kwargs, tmp):
    def run():
        import torch

        torch.manual_seed(0)
        if not tmp:
            return fn(**kwargs)
        folder = tempfile.mkdtemp(prefix="mutinproc")
        try:
            return fn(**kwargs, tmp_path=Path(folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", help="the mutated file, e.g. ftlab/methods/native/lora.py")
    parser.add_argument("tests", help="test modules, comma-separated, importable from tests/ "
                        "(methods.test_native_lora)")
    parser.add_argument("--generate", action="store_true", help="first (re)generate the mutants of changed modules")
    parser.add_argument("--only", default="", help="comma-separated mutant names to run (default: all of the module)")
    parser.add_argument("--json", type=Path, help="write {mutant: killed|timeout|survived|no tests} here")
    args = parser.parse_args(argv)
    if args.generate:
        generate()
    os.chdir(ROOT)  # mutmut's config (pyproject.toml) for the trampolines' stats pass
    sys.path[:0] = [str(ROOT / "mutants"), str(ROOT / "tests")]
    os.environ["MUTANT_UNDER_TEST"] = ""
    module_name = args.module.removesuffix(".py").replace("/", ".")
    module = importlib.import_module(module_name)
    if not module.__file__.startswith(str(ROOT / "mutants")):
        raise SystemExit(f"{module.__file__} is not mutmut's copy: run `mutmut run` once, without PYTHONPATH")
    calls, left_out = collect(args.tests.split(","))
    print(f"{len(calls)} test calls; left out (fixtures, slow, gpu): {', '.join(left_out) or 'none'}", flush=True)

    # Clean pass: every test passes unmutated; record its time and the functions it calls.
    import mutmut.mutation.trampoline as trampoline

    hits: set[str] = set()
    trampoline.record_trampoline_hit = lambda name, caller=None: hits.add(name)
    os.environ["MUTANT_UNDER_TEST"] = "stats"
    reach, seconds = {}, {}
    for test_id, run in calls:
        hits.clear()
        start = time.perf_counter()
        run()
        seconds[test_id] = time.perf_counter() - start
        reach[test_id] = {h for h in hits if h.startswith(module_name + ".")}
    os.environ["MUTANT_UNDER_TEST"] = ""
    print(f"clean pass: {sum(seconds.values()):.1f} s", flush=True)
    by_speed = sorted(calls, key=lambda c: seconds[c[0]])

    keys = sorted(json.loads((ROOT / "mutants" / (args.module + ".meta")).read_text())["exit_code_by_key"])
    if args.only:
        wanted = set(args.only.split(","))
        keys = [k for k in keys if k in wanted]
    signal.signal(signal.SIGALRM, _alarm)
    result = {}
    start_all = time.perf_counter()
    for key in keys:
        function = key.rpartition("__mutmut_")[0]
        tests = [(t, run) for t, run in by_speed if function in reach[t]]
        if not tests:
            result[key] = "no tests"
            continue
        os.environ["MUTANT_UNDER_TEST"] = key
        result[key] = "survived"
        for test_id, run in tests:
            signal.alarm(int(10 * seconds[test_id] + 5))
            try:
                run()
            except _Timeout:
                result[key] = "timeout"
            except BaseException:  # any failure, as pytest would count it
                result[key] = "killed"
            finally:
                signal.alarm(0)
            if result[key] != "survived":
                break
    os.environ["MUTANT_UNDER_TEST"] = ""
    counts = {v: sum(1 for r in result.values() if r == v) for v in ("killed", "timeout", "survived", "no tests")}
    print(f"{args.module}: {len(keys)} mutants, {counts['killed']} killed, {counts['timeout']} timed out, "
          f"{counts['survived']} survived, {counts['no tests']} reached by no test "
          f"({time.perf_counter() - start_all:.0f} s)")
    for key, verdict in result.items():
        if verdict in ("survived", "no tests"):
            print(f"{verdict:9} {key}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
