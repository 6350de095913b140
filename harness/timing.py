"""Wall-clock timing of a zero-argument closure: do_bench on CUDA, Timer on CPU.

On CUDA a closure may instead be timed as a CUDA-graph replay under the same do_bench (L2
flushed before every call): the same kernels without the CPU work of launching them, which at
short lengths outlasts the GPU work of multi-kernel variants (`benchmarks/launch_overhead.py`).
`EventClock` gives the same per-call CUDA-event measurement to timers that read a clock
before and after a call (pytest-benchmark)."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimeStats:
    """Median and 20th/80th percentile of the per-call time, in milliseconds."""

    median: float
    p20: float
    p80: float


def time_closure(
    fn: Callable[[], object],
    device: torch.device,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    cuda_graph: bool = False,
    min_samples: int = 10,
) -> TimeStats:
    """Time `fn` after the caller has already run it once (compilation, autotuning).

    CUDA: `triton.testing.do_bench`, which flushes L2 between calls and times with events.
    CPU: `torch.utils.benchmark.Timer.blocked_autorange`, percentiles over its blocks.

    Args:
        fn: the measured call, built outside timing.
        device: where `fn` runs.
        warmup_ms, rep_ms: do_bench's warm-up and measuring budgets; on the CPU `rep_ms` is
            the minimum total run time.
        grad_to_none: tensors whose `.grad` is reset between calls (backward timing).
        cuda_graph: CUDA only: capture `fn` once and time its replays (a closure that cannot be
            captured raises, and its case becomes an error row).
        min_samples: the fewest timed samples, whatever `rep_ms` allows: a call slower than
            the budget is still sampled this often, so that p20 and p80 describe a spread.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        if cuda_graph:
            fn, grad_to_none = graph_replay(fn, grad_to_none), None

        # do_bench repeats rep / (its estimate of one call) times: stretch rep to min_samples.
        rep = max(rep_ms, 1.25 * min_samples * one_call_ms(fn, grad_to_none))
        median, p20, p80 = do_bench(
            fn, warmup=warmup_ms, rep=rep, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]
        )
        return TimeStats(median, p20, p80)

    from torch.utils.benchmark import Timer

    def call():
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        fn()

    timer = Timer(stmt="call()", globals={"call": call})
    measurement = timer.blocked_autorange(min_run_time=rep_ms / 1000)
    samples = list(measurement.times)
    while len(samples) < min_samples:  # a slow call: more blocks of the same size
        samples += timer.timeit(measurement.number_per_run).times
    times = torch.tensor(samples, dtype=torch.float64) * 1000
    p20, median, p80 = torch.quantile(times, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return TimeStats(float(median), float(p20), float(p80))


def one_call_ms(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] | None) -> float:
    """The CUDA time of one call of `fn`, by events (a rough figure for sizing do_bench)."""
    for t in grad_to_none or ():
        t.grad = None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def graph_replay(
    fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] | None = None
) -> Callable[[], None]:
    """`fn` captured in a CUDA graph, after warm-up calls on a side stream (as PyTorch's CUDA
    graph notes prescribe); returns the replay. Gradients in `grad_to_none` are reset before
    the capture, so that every replay writes fresh ones, as the uncaptured timing does, rather
    than accumulating into them."""

    def reset_grads():
        for t in grad_to_none or ():
            t.grad = None

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            reset_grads()
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    reset_grads()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class EventClock:
    """A clock that advances only by the GPU time of the calls it times, in seconds.

    `timed(fn)` returns a call that, as do_bench does for each sample, resets the gradients
    in `grad_to_none`, flushes L2 (zeroes a 256 MiB buffer) and times `fn` between two CUDA
    events; `now()` reads the sum of those times. A timer that reads the clock before and
    after a call (pytest-benchmark's) so records that call's CUDA-event time.
    """

    def __init__(self):
        self.seconds = 0.0
        self._flush: torch.Tensor | None = None

    def now(self) -> float:
        return self.seconds

    def timed(self, fn: Callable[[], object],
              grad_to_none: Sequence[torch.Tensor] | None = None) -> Callable[[], None]:
        if self._flush is None:
            self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def call():
            for t in grad_to_none or ():
                t.grad = None
            self._flush.zero_()
            start.record()
            fn()
            end.record()
            end.synchronize()
            self.seconds += start.elapsed_time(end) * 1e-3

        return call


def sample_counts(one_call: float, warmup_ms: float, rep_ms: float,
                  min_samples: int) -> tuple[int, int]:
    """(warm-up calls, timed calls) for a call of `one_call` ms, as `time_closure` sizes them:
    the budgets' worth of calls, and at least `min_samples` timed ones."""
    one_call = max(one_call, 1e-3)
    return max(1, math.ceil(warmup_ms / one_call)), max(min_samples, math.ceil(rep_ms / one_call))
