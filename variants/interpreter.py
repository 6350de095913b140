"""bf16 arithmetic in Triton's CPU interpreter as the GPU does it.

Under `TRITON_INTERPRET=1` Triton (a) converts fp32 to bf16 by dropping the low mantissa bits
(rounding toward zero), while the GPU rounds to nearest even, and (b) multiplies bf16 `tl.dot`
operands as their raw 16-bit patterns, as if they were integers. (a) makes a kernel that
stores a bf16 partial result and adds to it in later passes drift by up to one bf16 ulp per
pass, in one direction; (b) makes any bf16 matmul meaningless. `use_hardware_rounding()`
patches both, so CPU tests judge a kernel's bf16 results as the GPU would compute them.
"""
from __future__ import annotations

import os

import numpy as np
import torch


def _round_fp32_to_bf16(data: np.ndarray) -> np.ndarray:
    """fp32 array -> its bf16 bit patterns (uint16), rounded to nearest even."""
    bits = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.bfloat16)
    return bits.view(torch.int16).numpy().view(np.uint16)


def _bf16_values(data: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> their values as fp32 (exact)."""
    return (data.astype(np.uint32) << 16).view(np.float32)


def use_hardware_rounding() -> bool:
    """Patch the interpreter's fp32 -> bf16 cast and its bf16 dot (once); False when not
    interpreting."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "hardware_rounding", False):
        return True
    plain_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_round_fp32_to_bf16(src.data), tl.bfloat16)
        return plain_cast(self, src, dst_type)

    plain_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = interpreter.TensorHandle(_bf16_values(a.data), tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = interpreter.TensorHandle(_bf16_values(b.data), tl.float32)
        return plain_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    cast_impl.hardware_rounding = True
    builder.cast_impl = cast_impl  # every cast method calls it through self
    builder.create_dot = create_dot
    return True
