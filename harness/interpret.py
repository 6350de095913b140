"""Triton interpreter (TRITON_INTERPRET=1) fix for CPU runs: its `tl.dot` multiplies bf16
operands as raw uint16 bit patterns (triton-lang/triton#11584). `widen_bf16_dots()` makes it
widen bf16 operands to float32 first, as the GPU's bf16 dot does. Kernels that already upcast
their dot operands under the interpreter are unaffected (their operands are not bf16).
"""
from __future__ import annotations

import os

_PATCHED = False


def widen_bf16_dots() -> bool:
    """Install the fix when running under the interpreter; True when it is in place."""
    global _PATCHED
    if _PATCHED or os.environ.get("TRITON_INTERPRET") != "1":
        return _PATCHED
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            data = (h.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
    _PATCHED = True
    return True
