"""Method registry: ``method=NAME`` in config maps to a builder registered here.

The registry is the one list of methods: sweeps (``method: all``), the docs check, the test
matrix and the CLI's messages read it. Built-in methods register themselves when their module
is imported; every module in ``ftlab/methods/peft/`` and ``ftlab/methods/native/`` is imported
the first time the registry is asked, so a new method is one module (or one builder in an
existing one) plus its ``conf/method/<name>.yaml``. Methods from outside ftlab register the
same way from a module named in the config's ``plugins`` list.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Callable

from ftlab.errors import ConfigError, did_you_mean
from ftlab.methods.base import Method

_BUILDERS: dict[str, Callable[..., Method]] = {}
# Packages whose modules hold the built-in methods, imported by name (not by an import
# statement) so that they may import this module without a cycle.
BUILTIN_PACKAGES = ("ftlab.methods.peft", "ftlab.methods.native")
BUILTIN_MODULES = ("ftlab.methods.full",)
_loaded = False


def register(name: str):
    """Register ``builder(**flat_kwargs) -> Method`` under ``name``."""

    def deco(builder: Callable[..., Method]) -> Callable[..., Method]:
        if name in _BUILDERS and _BUILDERS[name] is not builder:
            raise ValueError(f"method {name!r} registered twice")
        _BUILDERS[name] = builder
        return builder

    return deco


def available() -> list[str]:
    """Every registered method name, sorted."""
    _load_builtin()
    return sorted(_BUILDERS)


def build_method(name: str, **params: Any) -> Method:
    """Build a method from its config values, with clear messages for unknown names/keys."""
    _load_builtin()
    if name not in _BUILDERS:
        raise ConfigError(
            f"unknown method {name!r}{did_you_mean(name, _BUILDERS)}; valid: {', '.join(sorted(_BUILDERS))}"
        )
    builder = _BUILDERS[name]
    accepted = inspect.signature(builder).parameters
    for key in params:
        if key not in accepted:
            raise ConfigError(
                f"method.{key} is not a setting of method {name!r}{did_you_mean(key, accepted)}; "
                f"its settings: {', '.join(accepted)}"
            )
    return builder(**params)


def method_from_spec(spec: dict[str, Any]) -> Method:
    """Build a method from a run's ``method`` settings (``{"name": ..., **params}``); ``lr``, the
    method's default learning rate, is read by the optimizer config, not by the method."""
    return build_method(spec["name"], **{k: v for k, v in spec.items() if k not in ("name", "lr")})


def import_plugins(modules: list[str]) -> None:
    """Import the modules a config names in ``plugins`` (where outside methods register)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"plugins: cannot import {module!r} ({err}); it must be importable "
                              "from the current directory or PYTHONPATH") from None


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for package in BUILTIN_PACKAGES:
        path = importlib.import_module(package).__path__
        for info in pkgutil.iter_modules(path):
            importlib.import_module(f"{package}.{info.name}")
