"""Test plugin (CUDA): a Triton kernel that stores far outside its buffer.

fault_illegal_access launches a one-block kernel that writes 2^40 elements past the start of
a small tensor, then synchronizes: CUDA reports "an illegal memory access was encountered"
and the process's CUDA context is unusable from then on. Used by
scripts/illegal_access_check.sh to show that the isolating worker turns it into one `error`
row per case and that the sweep's other variants still measure.
"""
import torch
import triton
import triton.language as tl

from harness.registry import register_variant

FAR = 1 << 40  # elements past the buffer: no allocation reaches that far


@triton.jit
def _store_far(out_ptr, offset, BLOCK: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    tl.store(out_ptr + offset + idx, tl.zeros([BLOCK], dtype=tl.float32))


@register_variant("fault_illegal_access", family="softmax", devices=("cuda",),
                  requires=("triton",))
def make_illegal_access(shape):
    """Writes far out of bounds on every call (an illegal memory access)."""
    def call(q, k, v):
        scratch = torch.empty(128, device=q.device, dtype=torch.float32)
        _store_far[(1,)](scratch, FAR, BLOCK=128)
        torch.cuda.synchronize(q.device)
        return v.clone()
    return call
