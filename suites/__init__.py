"""Measurement suites. Every module of this package that calls `harness.suite.register_suite`
is a built-in suite: adding a suite is adding one file here (or a `--plugin` file)."""
from __future__ import annotations

import pkgutil
from importlib import import_module


def load_builtin_suites() -> None:
    """Import every module of this package; each suite registers itself on import."""
    for module in pkgutil.iter_modules(__path__):
        import_module(f"{__name__}.{module.name}")
