"""Time registered variants on the GPU at one problem size, as the harness times them.

Per variant, causal flag and mode: the median time (p20-p80), the bandwidth over the fewest
bytes any attention moves, the share of the device's roofline floor, the peak extra memory of
an inference call, and the launch config the variant reports (its `observations()`).

    python benchmarks/variant_times.py window_triton window_flex --param window_triton.bandwidth=30
    python benchmarks/variant_times.py fmmformer_triton linear_triton --modes fwd fwd_bwd bwd
"""
from __future__ import annotations

from common import Log, build_trial, cuda_device, fmt_time, shape_parser, shapes, time_ms

from harness.memory import peak_extra_mib
from harness.roofline import measure_roofline

MODES = ("fwd", "bwd", "fwd_bwd")


def main() -> None:
    parser = shape_parser(__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="registered variant names")
    parser.add_argument("--param", action="append", default=[], metavar="VARIANT.PARAM=VALUE")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["fwd", "fwd_bwd"])
    parser.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays")
    args = parser.parse_args()
    device = cuda_device()
    log = Log(args.log)
    roofline = measure_roofline(device)
    log(f"{device} {roofline}")
    for shape in shapes(args):
        for name in args.variants:
            trial = build_trial(name, shape, device, args.param)
            peak = peak_extra_mib(trial.forward, device)
            for mode in args.modes:
                fn, grads = trial.closure(mode)
                stats = time_ms(fn, device, grads, args.cuda_graph)
                floor = roofline.floor_ms(trial.flops(mode) or 0.0, trial.min_bytes(mode))
                gbps = trial.min_bytes(mode) / stats.median / 1e6
                log(f"{trial.variant.label:28} causal={shape.causal!s:5} {mode:7} "
                    f"{fmt_time(stats)}  {gbps:6.0f} GB/s  floor {100 * floor / stats.median:5.1f}%"
                    + (f"  fwd peak {peak:.1f} MiB" if mode == "fwd" else ""))
            observe = getattr(trial.fn, "observations", None)
            if observe:
                log(f"  {observe()}")
            del trial


if __name__ == "__main__":
    main()
