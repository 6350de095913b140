"""What the Triton kernel files share: the head dims and dtypes they take, input checks, buffer
allocation, the SM count, picking the fastest launch config, and the jit building blocks
(`dot` and the feature maps phi_l of linear attention and the FMMformer far field).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import TypeVar

import torch
import triton
import triton.language as tl

from harness.registry import Shape

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# The kernels work in log2 units (exp2 is the native instruction); jit code reads only constexprs.
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)

Factory = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]
_buffer_factory: list[Factory] = [lambda shape, dtype, device: torch.empty(
    shape, dtype=dtype, device=device)]


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer a kernel must fill (every kernel file allocates its outputs and scratch here)."""
    return _buffer_factory[-1](tuple(shape), dtype, device)


@contextlib.contextmanager
def allocate_with(factory: Factory) -> Iterator[None]:
    """Allocate the kernels' buffers with `factory` inside the block (tests fill them with NaN,
    so that an element a kernel never writes shows up, or record what is allocated)."""
    _buffer_factory.append(factory)
    try:
        yield
    finally:
        _buffer_factory.remove(factory)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 under the interpreter (small test grids)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


class ObservesLaunch:
    """Mixin of a registered Triton callable or module: `observations()` reports the launch
    config of its last call, which the call records as text in `last_launch`."""

    last_launch: str | None = None

    def observations(self) -> dict[str, str]:
        """{"launch_config": text} of the last call (empty before the first)."""
        return {"launch_config": self.last_launch} if self.last_launch else {}


def check_qkv(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless q, k, v are one `[B, H, N, D]` shape and dtype the kernels take."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        shapes = ", ".join(str(tuple(t.shape)) for t in (q, k, v))
        raise ValueError(f"{name}: q, k, v must share one [B, H, N, D] shape; got {shapes}")
    if not q.dtype == k.dtype == v.dtype:
        dtypes = f"{q.dtype}, {k.dtype}, {v.dtype}"
        raise ValueError(f"{name}: q, k, v must share one dtype; got {dtypes}")
    reason = unsupported_shape(name, Shape(*q.shape, dtype=q.dtype))
    if reason:
        raise ValueError(reason)


def band_limit(n: int, bandwidth: int) -> int:
    """The effective band k for N keys: k >= N is full attention; clamping keeps every index
    a kernel computes from k inside int32."""
    return min(int(bandwidth), max(n - 1, 0))


def unsupported_shape(name: str, shape: Shape) -> str | None:
    """Why the kernels of `name` cannot take `shape`'s head dim or dtype (None when they can)."""
    if shape.head_dim not in HEAD_DIMS:
        return f"{name} needs head_dim in {HEAD_DIMS}, got {shape.head_dim}"
    if shape.dtype not in DTYPES:
        return f"{name} needs dtype fp16/bf16/fp32, got {shape.dtype}"
    return None


T = TypeVar("T")
_FASTEST: dict[Hashable, object] = {}


def fastest(key: Hashable, candidates: Sequence[T], launch: Callable[[T], object]) -> T:
    """The candidate config whose `launch` runs fastest, measured once per `key` with
    `triton.testing.do_bench` (short budgets: a new key times every candidate) and remembered."""
    if len(candidates) == 1:
        return candidates[0]
    if key not in _FASTEST:
        times = [triton.testing.do_bench(lambda c=c: launch(c), warmup=5, rep=25, quantiles=[0.5])
                 for c in candidates]
        _FASTEST[key] = candidates[times.index(min(times))]
    return _FASTEST[key]


def chosen(key: Hashable) -> object | None:
    """What `fastest` chose for `key` (None before it was asked)."""
    return _FASTEST.get(key)


# ---------------------------------------------------------------------------------------------
# jit building blocks
# ---------------------------------------------------------------------------------------------
@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """`a @ b + acc` on the tensor cores (acc None: a fresh fp32 product)."""
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def phi_one(x, which):
    """phi_l(x), fp32, for l = `which` (run time or constexpr), from x alone: elu(x) + 1,
    elu(-x) + 1 or tanh(x) + 1 written as 2 / (1 + exp(-2x)) (never overflows). One exp per
    element, the maps' formulas behind a scalar branch, so that a tile holds one map's
    temporaries."""
    x = x.to(tl.float32)
    if which == 2:
        y = 2.0 / (1.0 + tl.exp(-2.0 * x))
    else:
        t = x * (1.0 - 2.0 * which)  # x, or -x for elu(-x) + 1
        y = tl.where(t > 0, t + 1.0, tl.exp(tl.minimum(t, 0.0)))
    return y


@triton.jit
def phi_one_grad(x, which):
    """phi_l(x) and phi_l'(x), fp32 (see `phi_one`)."""
    x = x.to(tl.float32)
    if which == 2:
        y = 2.0 / (1.0 + tl.exp(-2.0 * x))
        dy = y * (2.0 - y)
    else:
        sign = 1.0 - 2.0 * which
        t = x * sign
        e = tl.exp(tl.minimum(t, 0.0))
        y = tl.where(t > 0, t + 1.0, e)
        dy = tl.where(t > 0, 1.0, e) * sign
    return y, dy


@triton.jit
def exp_neg_abs(x):
    """exp(-|x|) at x's precision: one exp per element serves every feature map, and bf16
    tiles held across the maps take half the registers of fp32 ones."""
    return tl.exp(-tl.abs(x.to(tl.float32))).to(x.dtype)


@triton.jit
def phi_map(x, e, L: tl.constexpr):
    """phi_L(x), fp32, from x and e = `exp_neg_abs(x)`: elu(x) + 1, elu(-x) + 1, and
    tanh(x) + 1 = 2 / (1 + e^2) for x >= 0, 2 - that below."""
    x = x.to(tl.float32)
    e = e.to(tl.float32)
    if L == 0:
        y = tl.where(x > 0, x + 1.0, e)
    elif L == 1:
        y = tl.where(x < 0, 1.0 - x, e)
    else:
        r = 1.0 / (1.0 + e * e)
        y = tl.where(x >= 0, 2.0 * r, 2.0 - 2.0 * r)
    return y


@triton.jit
def phi_prep(x):
    """(e, r) = (exp(-|x|), 1 / (1 + e^2)) in x's dtype: every feature map's transcendentals,
    once per tile, held at input precision (bf16 feeds bf16 matmuls anyway) to save registers."""
    e = tl.exp(-tl.abs(x.to(tl.float32)))
    return e.to(x.dtype), (1.0 / (1.0 + e * e)).to(x.dtype)


@triton.jit
def phi_grad(x, e, r, which):
    """phi_l(x) and phi_l'(x), fp32, for a run-time l, branch-free from x, e and r
    (`phi_prep`): elu(x) + 1, elu(-x) + 1, and tanh(x) + 1 = 2r for x >= 0, 2 - 2r below.
    A loop over the maps then pays no map's transcendentals twice."""
    x = x.to(tl.float32)
    e = e.to(tl.float32)
    sign = tl.where(which == 1, -1.0, 1.0)
    t = x * sign
    y12 = tl.where(t > 0, 1.0 + t, e)
    dy12 = tl.where(t > 0, 1.0, e) * sign
    r = r.to(tl.float32)
    y3 = tl.where(x >= 0, 2.0 * r, 2.0 - 2.0 * r)
    is3 = which == 2
    return tl.where(is3, y3, y12), tl.where(is3, y3 * (2.0 - y3), dy12)


@triton.jit
def softmax_bwd_head(q_ptr, k_ptr, v_ptr, do_ptr, x_ptr, y_ptr, lse_ptr, delta_ptr, bh, N,
                     HEAD_DIM: tl.constexpr):
    """A softmax backward program's pointers moved to head `bh`: q, k, v, dO, the kernel's own
    two `[N, HEAD_DIM]` tensors x, y, and the per-row lse and delta."""
    head = bh * N * HEAD_DIM
    return (q_ptr + head, k_ptr + head, v_ptr + head, do_ptr + head, x_ptr + head,
            y_ptr + head, lse_ptr + bh * N, delta_ptr + bh * N)


@triton.jit
def row_tile(start, N, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Rows start .. start + BLOCK of a `[N, HEAD_DIM]` tensor: their offsets, the head-dim
    offsets, the mask of rows below N and the tile's element offsets."""
    offs = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    return offs, offs_d, offs < N, offs[:, None] * HEAD_DIM + offs_d[None, :]


@triton.jit
def softmax_kv_cols(k_ptr, v_ptr, n0, N, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key tile of a softmax dK/dV program (pointers already at its head): its offsets,
    mask and tile offsets, k and v."""
    offs_n, offs_d, col_ok, kv_offs = row_tile(n0, N, HEAD_DIM, BLOCK_N)
    # [BLOCK_N, HEAD_DIM]
    kt = tl.load(k_ptr + kv_offs, mask=col_ok[:, None], other=0.0)
    vt = tl.load(v_ptr + kv_offs, mask=col_ok[:, None], other=0.0)
    return offs_n, offs_d, col_ok, kv_offs, kt, vt


@triton.jit
def softmax_dq_rows(q_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, m0, N,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """The query rows of a softmax dq program (pointers already at its head): their offsets,
    mask and tile offsets, q, dO, delta = rowsum(o * dO) and the log2-domain log-sum-exp.

    delta is also stored for the dK/dV kernel launched after: the dq kernel reads dO anyway, so
    delta needs no pass of its own.
    """
    offs_m, offs_d, row_ok, qo_offs = row_tile(m0, N, HEAD_DIM, BLOCK_M)
    # [BLOCK_M, HEAD_DIM]
    q = tl.load(q_ptr + qo_offs, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + qo_offs, mask=row_ok[:, None], other=0.0)
    o = tl.load(o_ptr + qo_offs, mask=row_ok[:, None], other=0.0)
    # [BLOCK_M]
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + offs_m, delta, mask=row_ok)
    lse2 = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0) * LOG2E_C
    return offs_m, offs_d, row_ok, qo_offs, q, do, delta, lse2
