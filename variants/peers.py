"""Optional external peers: fla (linear), flash-attn and xformers (softmax and window).

Each is detected at run time: a missing package is a `skipped` row, and `available` tries
one tiny CUDA call, so a package that imports but cannot run (too old a GPU, a broken build)
gives a one-line reason instead of a crash. flash-attn is flash-attn-4 (`flash_attn.cute`)
when installed, else flash-attn 2; the rows name the one that ran (`backend_ran`). An
xformers built for another torch or CUDA (its shipped build record says which) is not run:
its reason names both versions. Nothing here imports the packages at module import.

All three take `[B, N, H, D]` tensors while variants receive `[B, H, N, D]`: the callables
transpose inside, so the timed call includes the layout work (flash-attn and xformers take the
strided view as is; for fla the callable makes contiguous copies, as fla would itself).
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.registry import Shape, register_variant
from variants.linear import FEATURE_MAPS, LINEAR_CHOICES, LINEAR_PARAMS, linear_flops
from variants.softmax import softmax_flops
from variants.window import WINDOW_PARAMS, WINDOW_SHORT, check_bandwidth, window_flops

HAS_FLA = importlib.util.find_spec("fla") is not None
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def _probe(name: str, call) -> str | None:
    """Run `call()` on the GPU once: None when it works, else why `name` cannot run."""
    if not torch.cuda.is_available():
        return f"{name} needs CUDA"
    try:
        call()
        torch.cuda.synchronize()
    except Exception as exc:  # any failure means: this peer cannot run here
        return f"{name} is installed but cannot run: {_one_line(exc)}"
    return None


def _tiny(dtype=torch.bfloat16) -> list[torch.Tensor]:
    return [torch.randn(1, 64, 2, 64, device="cuda", dtype=dtype) for _ in range(3)]


# ----------------------------------------------------------------------------------------------
# fla: chunked linear attention (causal).


@functools.cache
def fla_available(device: torch.device) -> str | None:
    """None when fla's chunk_linear_attn runs on this GPU, else a one-line reason."""

    def call():
        from fla.ops.linear_attn import chunk_linear_attn

        q, k, v = _tiny()
        chunk_linear_attn(q, k, v, scale=1.0, normalize=True)

    return _probe("fla", call)


class FlaLinearAttention:
    """fla's `chunk_linear_attn` on `phi(q), phi(k)` with `scale=1`, `normalize=True`.

    That computes `phi(q_i)^T S_i / (phi(q_i)^T z_i + 1e-10)`, i.e. `linear` (causal) except
    for the normalizer's epsilon (1e-10 instead of 1e-6) and fla keeping the running key sum
    `z` in the input dtype. phi is applied by PyTorch before the call (fla has no feature map
    inside its kernel), and the layout change to `[B, N, H, D]` happens inside the call.
    """

    def __init__(self, feature_map: str):
        from fla.ops.linear_attn import chunk_linear_attn

        self.fn = chunk_linear_attn
        self.phi = FEATURE_MAPS[feature_map]

    def __call__(self, q, k, v):
        # One contiguous [B, N, H, D] copy each, shared by fla's state and normalizer passes.
        fq, fk, v = (t.transpose(1, 2).contiguous() for t in (self.phi(q), self.phi(k), v))
        o, _ = self.fn(fq, fk, v, scale=1.0, normalize=True)
        return o.transpose(1, 2)


def check_half(shape: Shape, params: dict) -> str | None:
    if shape.dtype not in (torch.float16, torch.bfloat16):
        return f"needs fp16/bf16, not {shape.dtype}"
    return None


@register_variant(
    "linear_fla",
    family="linear",
    params=LINEAR_PARAMS,
    short={"feature_map": "phi"},
    choices=LINEAR_CHOICES,
    causal=(True,),
    devices=("cuda",),
    requires=("fla",),
    available=fla_available,
    check=check_half,
    reference="linear",
    flops=linear_flops,
)
def make_linear_fla(shape: Shape, feature_map: str):
    """fla chunk_linear_attn (causal), phi applied first; eps 1e-10 (linear uses 1e-6)."""
    return FlaLinearAttention(feature_map)


# ----------------------------------------------------------------------------------------------
# flash-attn: flash-attn-4 (CuTe DSL, `flash_attn.cute`) when installed, else flash-attn 2.


@dataclass(frozen=True)
class FlashAttn:
    """One installed flash-attn: its distribution name and version, and its attention call.

    `attend(q, k, v, causal, window)` takes `[B, N, H, D]` tensors and a `(left, right)` window
    (`(-1, -1)`: no window) and returns `o` in the same layout.
    """

    package: str
    attend: Callable


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def _has_module(name: str) -> bool:
    """Whether module `name` is installed. Finding a submodule imports its package: a package
    that is there but fails to import counts as installed (its probe then says why)."""
    if importlib.util.find_spec(name.partition(".")[0]) is None:
        return False
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
    except Exception:  # noqa: BLE001 - the package's own import failed
        return True


def _flash_attn_4() -> FlashAttn:
    from flash_attn.cute import flash_attn_func

    def attend(q, k, v, causal, window):
        out, _lse = flash_attn_func(q, k, v, causal=causal, window_size=window)
        return out

    return FlashAttn(f"flash-attn-4 {_version('flash-attn-4')}", attend)


def _flash_attn_2() -> FlashAttn:
    from flash_attn import flash_attn_func

    def attend(q, k, v, causal, window):
        return flash_attn_func(q, k, v, causal=causal, window_size=window)

    return FlashAttn(f"flash-attn {_version('flash-attn')}", attend)


# (module that marks it installed, name, builder), tried in this order: the first whose tiny
# CUDA call works is the one measured.
FLASH_ATTN_BUILDS = (
    ("flash_attn.cute", "flash-attn-4", _flash_attn_4),
    ("flash_attn.flash_attn_interface", "flash-attn 2", _flash_attn_2),
)
FLASH_ATTN_MISSING = "neither flash-attn-4 (flash_attn.cute) nor flash-attn 2 is installed"


@functools.cache
def flash_attn_build(device: torch.device) -> FlashAttn | str:
    """The flash-attn that runs on this GPU (flash-attn-4 first), else a one-line reason."""
    installed = [(name, make) for module, name, make in FLASH_ATTN_BUILDS if _has_module(module)]
    if not installed:
        return FLASH_ATTN_MISSING
    if not torch.cuda.is_available():
        return "flash-attn needs CUDA"
    reasons = []
    for name, make in installed:
        found: list[FlashAttn] = []

        def call(make=make, found=found):
            build = make()
            build.attend(*_tiny(), True, (-1, -1))
            found.append(build)

        reason = _probe(name, call)
        if reason is None:
            return found[0]
        reasons.append(reason)
    return "; ".join(dict.fromkeys(reasons))


def flash_attn_available(device: torch.device) -> str | None:
    """None when a flash-attn runs on this GPU, else a one-line reason."""
    build = flash_attn_build(device)
    return build if isinstance(build, str) else None


def check_flash(shape: Shape, params: dict) -> str | None:
    if shape.head_dim > 256 or shape.head_dim % 8:
        return f"flash-attn needs head_dim <= 256 and a multiple of 8, got {shape.head_dim}"
    return check_half(shape, params)


class FlashAttention:
    """flash-attn on `[B, N, H, D]` views of the inputs (no copy: the last dim is unit-stride);
    `detect_backend` names the flash-attn package and version that ran."""

    def __init__(self, causal: bool, window: tuple[int, int]):
        reason = flash_attn_available(torch.device("cuda"))
        if reason:
            raise RuntimeError(reason)
        self.build = flash_attn_build(torch.device("cuda"))
        self.causal, self.window = causal, window

    def __call__(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return self.build.attend(q, k, v, self.causal, self.window).transpose(1, 2)

    def detect_backend(self, q, k, v) -> str:
        return self.build.package


@register_variant(
    "softmax_flash_attn",
    family="softmax",
    devices=("cuda",),
    available=flash_attn_available,
    check=check_flash,
    reference="softmax_naive",
    flops=softmax_flops,
)
def make_softmax_flash_attn(shape: Shape):
    """flash-attn's flash_attn_func (flash-attn-4, else FlashAttention-2), dense or causal."""
    return FlashAttention(shape.causal, (-1, -1))


def check_flash_window(shape: Shape, params: dict) -> str | None:
    return check_bandwidth(shape, params) or check_flash(shape, params)


@register_variant(
    "window_flash_attn",
    family="window",
    params=WINDOW_PARAMS,
    short=WINDOW_SHORT,
    devices=("cuda",),
    available=flash_attn_available,
    check=check_flash_window,
    reference="window",
    flops=window_flops,
)
def make_window_flash_attn(shape: Shape, bandwidth: int):
    """flash-attn with window_size=(k, k), or (k, 0) causal: keys |i - j| <= k."""
    return FlashAttention(shape.causal, (bandwidth, 0 if shape.causal else bandwidth))


# ----------------------------------------------------------------------------------------------
# xformers: memory_efficient_attention, with a causal or local (banded) bias.


def xformers_build_mismatch() -> str | None:
    """Why the installed xformers was built for another PyTorch, read from the build record
    it ships (`xformers/cpp_lib.json`: the torch and CUDA versions of its build), or None when
    they match this torch (or the package ships no such record)."""
    spec = importlib.util.find_spec("xformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    record = Path(next(iter(spec.submodule_search_locations))) / "cpp_lib.json"
    try:
        built = json.loads(record.read_text())["version"]
        built_torch, code = str(built["torch"]), built.get("cuda")
        # CUDA as major * 100 + minor (1208: 12.8), as xformers writes it.
        built_cuda = None if code is None else f"{int(code) // 100}.{int(code) % 100}"
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ours_cuda = torch.version.cuda
    same_torch = built_torch.split("+")[0] == torch.__version__.split("+")[0]
    same_cuda = built_cuda is None or ours_cuda is None or built_cuda == ours_cuda
    if same_torch and same_cuda:
        return None
    return (f"xformers {_version('xformers')} is built for torch {built_torch}"
            f"{f', CUDA {built_cuda}' if built_cuda else ''}; this is torch {torch.__version__}"
            f"{f', CUDA {ours_cuda}' if ours_cuda else ''}")


@functools.cache
def xformers_available(device: torch.device) -> str | None:
    """None when memory_efficient_attention runs on this GPU, else a one-line reason (first:
    a build for another torch, which is not run at all)."""
    mismatch = xformers_build_mismatch()
    if mismatch:
        return mismatch

    def call():
        import xformers.ops as xops

        xops.memory_efficient_attention(*_tiny(), attn_bias=xops.LowerTriangularMask())

    return _probe("xformers", call)


def check_xformers(shape: Shape, params: dict) -> str | None:
    if shape.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"xformers takes fp16/bf16/fp32, not {shape.dtype}"
    return None


def make_xformers(causal: bool, bandwidth: int | None):
    """memory_efficient_attention on `[B, N, H, D]` views (strided, not copied)."""
    import xformers.ops as xops
    from xformers.ops.fmha import attn_bias

    if bandwidth is not None:
        # Key j is kept when i - left <= j <= i + right (equal lengths: no bottom-right shift).
        bias = attn_bias.LocalAttentionFromBottomRightMask(
            window_left=bandwidth, window_right=0 if causal else bandwidth
        )
    else:
        bias = xops.LowerTriangularMask() if causal else None

    def attend(q, k, v):
        o = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
        )
        return o.transpose(1, 2)

    return attend


@register_variant(
    "softmax_xformers",
    family="softmax",
    devices=("cuda",),
    requires=("xformers",),
    available=xformers_available,
    check=check_xformers,
    reference="softmax_naive",
    flops=softmax_flops,
)
def make_softmax_xformers(shape: Shape):
    """xformers memory_efficient_attention, dense or causal (LowerTriangularMask)."""
    return make_xformers(shape.causal, None)


def check_xformers_window(shape: Shape, params: dict) -> str | None:
    return check_bandwidth(shape, params) or check_xformers(shape, params)


@register_variant(
    "window_xformers",
    family="window",
    params=WINDOW_PARAMS,
    short=WINDOW_SHORT,
    devices=("cuda",),
    requires=("xformers",),
    available=xformers_available,
    check=check_xformers_window,
    reference="window",
    flops=window_flops,
)
def make_window_xformers(shape: Shape, bandwidth: int):
    """xformers memory_efficient_attention with a local band bias (|i - j| <= k)."""
    return make_xformers(shape.causal, bandwidth)

