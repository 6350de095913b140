"""Studies: analyses of one question each, plugged into `run_bench.py report`
(`harness.reports.study`). Every module or package here registers itself when imported."""
from __future__ import annotations

import pkgutil
from importlib import import_module


def load_studies() -> None:
    """Import every study of this package; each registers itself on import."""
    for module in pkgutil.iter_modules(__path__):
        import_module(f"{__name__}.{module.name}")
