"""What the GPU probe scripts share: a log that prints and appends, timing, kernel profiles."""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton


class ProbeLog:
    """Lines printed and appended to $OUT/<name> (the device call brings $OUT back)."""

    def __init__(self, name: str):
        self.path = os.path.join(os.environ.get("OUT", "/tmp"), name)

    def say(self, *parts) -> None:
        line = " ".join(map(str, parts))
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def bench(fn: Callable[[], object], rep: int = 100) -> float:
    """Median ms of `fn` (triton's do_bench, L2 flushed between calls)."""
    return triton.testing.do_bench(fn, warmup=25, rep=rep)


def kernel_times(fn: Callable[[], object], label: str, say: Callable, calls: int = 10) -> None:
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
            say(f"prof {label}: {e.key[:60]} x{e.count // calls} "
                f"{e.device_time_total / e.count / 1e3:.4f} ms each")
