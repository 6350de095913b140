"""Attention variants. Importing this package registers every built-in variant."""
import sys
from importlib import import_module

from variants.interpreter import use_hardware_rounding

# Under Triton's CPU interpreter, bf16 casts and dots compute as on the GPU (see the module).
use_hardware_rounding()

# One module per family; Triton modules sit beside their PyTorch references.
_MODULES = (
    "softmax",
    "window",
    "linear",
    "fmmformer",
    "fma",
    "window_triton",
    "linear_triton",
    "fmmformer_triton",
    "fma_triton",
    "peers",
)
# Modules that failed to import, with the reason (e.g. no Triton on this platform).
BROKEN_MODULES: dict[str, str] = {}


def load_builtin_variants() -> None:
    """Import every built-in variant module (each registers itself on import).

    A module that cannot be imported loses only its own variants: the reason is kept in
    `BROKEN_MODULES` and printed once, and the rest of the harness still runs.
    """
    for name in _MODULES:
        if name in BROKEN_MODULES:
            continue
        try:
            import_module(f"variants.{name}")
        except Exception as exc:  # noqa: BLE001 - one broken family must not stop the others
            BROKEN_MODULES[name] = f"{type(exc).__name__}: {exc}"
            print(f"warning: variants.{name} not loaded: {BROKEN_MODULES[name]}", file=sys.stderr)
