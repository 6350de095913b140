"""How much of a forward's time at short lengths is the Python-side launch path (GPU only).

Each variant's inference forward is built as the harness builds it and timed twice under the
harness's timing: as called, and as a replay of a CUDA graph captured from that call (the same
kernels without the CPU work of launching them). Where the two differ, a harness row measured
the CPU, not the GPU.

    python benchmarks/launch_overhead.py [--lengths 8192 16384 ...] [VARIANT ...]
"""
from __future__ import annotations

import dataclasses

from common import Log, build_trial, cuda_device, shape_parser, shapes, time_ms

VARIANTS = ("fma_triton", "fmmformer_triton", "linear_triton", "window_triton", "softmax_sdpa")


def main() -> None:
    parser = shape_parser(__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    args = parser.parse_args()
    device, log = cuda_device(), Log(args.log)
    log("inference fwd, ms: as called / as a CUDA-graph replay (launch path)")
    for name in args.variants:
        for base in shapes(args):
            for n in args.lengths:
                trial = build_trial(name, dataclasses.replace(base, seq_len=n), device)
                label = f"{name:17} causal={base.causal!s:5} N={n:6}"
                called = time_ms(trial.forward, device).median
                try:
                    replayed = time_ms(trial.forward, device, cuda_graph=True).median
                except RuntimeError as exc:  # a call that cannot be captured
                    log(f"{label}: {called:.4f} ms; capture failed: {str(exc)[:120]}")
                    continue
                log(f"{label}: {called:.4f} / {replayed:.4f} ms "
                    f"(launch path {called - replayed:+.4f})")
                del trial


if __name__ == "__main__":
    main()
