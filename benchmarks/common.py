"""What the benchmark programs share: the problem from the command line, a registered variant
built as the harness builds it, timing and peak memory through the harness's own code, a
per-kernel profile, and a log that prints and copies itself to $OUT."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.config import DTYPES, BenchConfig  # noqa: E402
from harness.registry import RegistryError, Shape, expand_configs, parse_param_overrides  # noqa: E402
from harness.timing import TimeStats, time_closure  # noqa: E402
from harness.trial import Trial, make_inputs  # noqa: E402
from variants import load_builtin_variants  # noqa: E402


def shape_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the problem's options (default: the fig6 shape at N = 2^16)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--causal", choices=("no", "yes", "both"), default="both")
    parser.add_argument("--log", default=None, help="also append the output to $OUT/LOG")
    return parser


def shapes(args: argparse.Namespace) -> list[Shape]:
    """The problem shapes `args` ask for, one per causal flag."""
    flags = {"no": (False,), "yes": (True,), "both": (False, True)}[args.causal]
    return [Shape(args.batch, args.heads, args.seq_len, args.head_dim, causal, DTYPES[args.dtype])
            for causal in flags]


def cuda_device() -> torch.device:
    """The GPU, or a one-line error and exit status 2 where there is none."""
    if not torch.cuda.is_available():
        fail("this benchmark needs a CUDA device")
    return torch.device("cuda")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def build_trial(name: str, shape: Shape, device: torch.device, params: Sequence[str] = (),
                seed: int = 0) -> Trial:
    """Registered variant `name` (with `VARIANT.PARAM=VALUE` overrides) built for `shape` on
    seeded random inputs, as the harness builds a case."""
    load_builtin_variants()
    try:
        (variant,) = expand_configs([name], parse_param_overrides(params))
    except (RegistryError, ValueError) as exc:
        fail(str(exc))
    reason = variant.spec.unavailable_reason(device) or variant.spec.unsupported_reason(
        shape, variant.params)
    if reason:
        fail(reason)
    torch.manual_seed(seed)
    fn = variant.build(shape)
    if isinstance(fn, torch.nn.Module):
        fn = fn.to(device)
    config = BenchConfig(device=device.type, seed=seed)
    return Trial(variant, fn, shape, make_inputs(shape, device, seed), device, config)


def time_ms(fn: Callable[[], object], device: torch.device, grad_to_none=None,
            cuda_graph: bool = False) -> TimeStats:
    """`fn` timed as the harness times a case (one untimed call first)."""
    for t in grad_to_none or ():
        t.grad = None
    fn()
    return time_closure(fn, device, grad_to_none=grad_to_none, cuda_graph=cuda_graph)


def fmt_time(stats: TimeStats) -> str:
    return f"{stats.median:.4f} ms ({stats.p20:.4f}-{stats.p80:.4f})"


class Log:
    """Lines printed and, with a name, appended to $OUT/<name> (or ./<name>)."""

    def __init__(self, name: str | None):
        self.path = Path(os.environ.get("OUT", "."), name) if name else None

    def __call__(self, *parts: object) -> None:
        line = " ".join(map(str, parts))
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def kernel_times(fn: Callable[[], object], label: str, log: Log, calls: int = 10) -> None:
    """Each CUDA kernel `fn` launches, with its mean time (torch.profiler over `calls` calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.count >= calls:
            log(f"  {label}: {e.key[:60]} x{e.count // calls} "
                f"{e.device_time_total / e.count / 1e3:.4f} ms each")
