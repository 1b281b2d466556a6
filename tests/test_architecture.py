"""The package's structure: one-way imports, entry points nothing imports, small modules,
each with a docstring, and a library import that changes no global state.

The import graph is built from the source with ``ast`` (every import, at module level or
inside a function), so an import hidden in a function to dodge a cycle still counts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "ftlab"
ENTRY_POINTS = {"ftlab.commands", "ftlab.cli", "ftlab.__main__", "ftlab.eval", "ftlab.export", "ftlab.report"}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` (an import of a package's own
    submodule by its ``__init__`` and of a module's parent package are not edges)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".") if is_pkg else name.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t in mods and t != name and not name.startswith(t + "."):
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    """The checker itself: a known cycle and a known acyclic graph."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_nothing_in_the_package_imports_an_entry_point():
    graph = import_graph()
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts
                 if t in ENTRY_POINTS and m not in ENTRY_POINTS)
    assert not bad, bad
    assert graph["ftlab.cli"], "the graph builder found no imports at all"


def test_every_module_is_small_and_says_what_it_is_for():
    for name, path in modules().items():
        source = path.read_text()
        assert len(source.splitlines()) <= MAX_LINES, f"{name}: over {MAX_LINES} lines (two concerns?)"
        if name != "ftlab.__main__":
            assert ast.get_docstring(ast.parse(source)), f"{name} has no module docstring"


def test_no_code_outside_methods_tests_a_method_name():
    """Method facts live in ``Method.traits``: no ``name == "full"`` outside ftlab/methods/."""
    needles = ('== "full"', "== 'full'", '"delta_lora"', "is_prompt_learning", "peft_config")
    for name, path in modules().items():
        if name.startswith("ftlab.methods") or name.startswith("ftlab.metrics.generation"):
            continue
        for needle in needles:
            assert needle not in path.read_text(), f"{name} mentions {needle}"


LIBRARY_MODULES = ("ftlab", "ftlab.methods", "ftlab.data", "ftlab.run", "ftlab.rundir", "ftlab.eval")


def test_importing_the_library_changes_no_global_filters():
    """A library import must not change warning or logging filters (the commands quiet
    third-party noise in their entry points). The third-party libraries ftlab uses are
    imported first, so whatever filters they set themselves are not counted; one process
    imports the modules in turn and reports what each import changed."""
    code = (
        "import importlib, logging, warnings\n"
        "import torch, lightning, transformers, peft, hydra, omegaconf, torchmetrics, datasets\n"
        "def state():\n"
        "    loggers = {n: len(l.filters) for n, l in logging.root.manager.loggerDict.items()\n"
        "               if isinstance(l, logging.Logger)}\n"
        "    return len(warnings.filters), loggers\n"
        f"for module in {LIBRARY_MODULES!r}:\n"
        "    filters, loggers = state()\n"
        "    importlib.import_module(module)\n"
        "    after_filters, after_loggers = state()\n"
        "    changed = [n for n, k in after_loggers.items() if k != loggers.get(n, 0)]\n"
        "    print(module, after_filters - filters, changed)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines() == [f"{m} 0 []" for m in LIBRARY_MODULES]


def test_the_commands_do_quiet_third_party_noise():
    """The other side of the rule above: ``quiet_third_party`` (called by every command) adds
    the filters, once however often it is called."""
    code = (
        "import logging, warnings\n"
        "from ftlab.console import quiet_third_party\n"
        "n = len(warnings.filters)\n"
        "quiet_third_party(); quiet_third_party()\n"
        "log = logging.getLogger('lightning.pytorch.utilities.rank_zero')\n"
        "print(len(warnings.filters) > n, len(log.filters))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True 1"
