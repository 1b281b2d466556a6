"""Value checks shared by the method builders, run before anything heavy is imported.

A bad value costs the user two seconds, not the five that importing peft and bitsandbytes
takes; each raises :class:`~ftlab.errors.ConfigError` naming the ``method.*`` key.
"""

from __future__ import annotations

from ftlab.errors import ConfigError, check_fraction, check_positive


def check_targets(target_modules) -> list[str] | str:
    if target_modules == "all-linear":
        return target_modules
    if isinstance(target_modules, str):
        return [target_modules]
    targets = list(target_modules or [])
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(
            f"method.target_modules must be a list of module names or 'all-linear', got {target_modules!r}"
        )
    return targets


def check_low_rank(r, alpha, dropout) -> None:
    check_positive("method.r", r, integer=True)
    check_positive("method.alpha", alpha)
    check_fraction("method.dropout", dropout)


def check_int(key: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def check_bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
