"""How much of a forward's time at short lengths is the Python-side launch path (GPU only).

Each variant's inference forward is built as `run_bench.py` builds it and timed twice under the
harness's own `triton.testing.do_bench` (L2 flushed before every call): as the harness calls
it, and as a replay of a CUDA graph captured from that call (the same kernels without the CPU
work of launching them). Where the two differ, the harness row measured the CPU, not the GPU.
bf16, B=1, H=16, D=64.

    python scripts/launch_probe.py [N ...]      (default 8192 16384 32768 65536)

Results go to $OUT/launch_probe.log.
"""

import sys

sys.path.insert(0, ".")
sys.path.insert(0, "scripts")
import torch
import triton.testing
from probe_common import ProbeLog

from harness.config import BenchConfig
from harness.registry import Shape, expand_configs
from harness.timing import graph_replay
from harness.trial import Trial, make_inputs
from variants import load_builtin_variants

say = ProbeLog("launch_probe.log").say
VARIANTS = ("fma_triton", "fmmformer_triton", "linear_triton", "window_triton", "softmax_sdpa")


def main(lengths: list[int]) -> None:
    load_builtin_variants()
    device = torch.device("cuda")
    config = BenchConfig(device="cuda", dtype="bf16", heads=16, head_dim=64)
    say(f"{torch.cuda.get_device_name()}: inference fwd, ms (do_bench with L2 flush): "
        "as called / as a CUDA-graph replay")
    for name in VARIANTS:
        (variant,) = expand_configs((name,), {})
        for causal in (False, True):
            for n in lengths:
                shape = Shape(1, 16, n, 64, causal, torch.bfloat16)
                torch.manual_seed(0)
                fn = variant.build(shape)
                if isinstance(fn, torch.nn.Module):
                    fn = fn.to(device)
                trial = Trial(variant, fn, shape, make_inputs(shape, device, 0), device, config)
                call = trial.closure("fwd")[0]
                call()
                called = triton.testing.do_bench(call, warmup=25, rep=100)
                label = f"{name:17} causal={causal!s:5} N={n:6}"
                try:
                    replay = graph_replay(call)
                except RuntimeError as exc:  # a call that cannot be captured
                    say(f"{label}: {called:.4f} ms; capture failed: {str(exc)[:120]}")
                    continue
                replayed = triton.testing.do_bench(replay, warmup=25, rep=100)
                say(f"{label}: {called:.4f} / {replayed:.4f} ms "
                    f"(launch path {called - replayed:+.4f})")
                del replay, trial, fn
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [8192, 16384, 32768, 65536])
