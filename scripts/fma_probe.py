"""FMA forward pieces on the GPU (bf16, H=16, N=65536, D=64, m=64, p=2).

    python scripts/fma_probe.py [configs] [prof] [bwd] [coarse] [tiles]

configs: the pooling pass alone and the attention kernel alone under a few launch configs,
and the whole forward. prof: the time of each kernel of the forward and backward
(torch.profiler). bwd: the backward alone per stage count and register caps of its
kernels, with each kernel's time. coarse: causal forward and fwd_bwd per coarse-token tile
width. tiles: the forward with two finest blocks per query tile (fewer near and coarse keys
per query, masks per block). Results go to $OUT/fma_probe.log.
"""

import dataclasses
import sys

sys.path.insert(0, ".")
sys.path.insert(0, "scripts")
import torch

import variants.fma_triton as ft
from probe_common import ProbeLog, kernel_times
from probe_common import bench as _bench

say = ProbeLog("fma_probe.log").say


def bench(f):
    return _bench(f, rep=200)


# (windows, block_t, warps, stages) of the pooling kernel; (block_n, stages, maxnreg) of the
# attention kernel.
POOL_TRIALS = [(16, 128, 4, 3), (16, 128, 8, 3)]
ATTENTION_TRIALS = {
    False: [(64, 2, 96), (64, 2, 128)],
    True: [(64, 1, 128), (64, 2, 128)],
}
dev, dt = "cuda", torch.bfloat16
h, n, d = 16, 65536, 64
q, k, v = (torch.randn(1, h, n, d, device=dev, dtype=dt) for _ in range(3))
bytes_min = 4 * q.numel() * 2
modes = sys.argv[1:] or ["configs"]
for causal in (False, True) if "configs" in modes else ():
    base = ft.launch_config(64, causal)
    plan = ft.fma_plan(n, 64, 2, causal, True, False, base.block_m, str(q.device))
    default = dict(ft.POOL_CONFIG)
    for windows, block_t, warps, stages in POOL_TRIALS:
        ft.POOL_CONFIG.update(windows=windows, block_t=block_t, num_warps=warps, num_stages=stages)
        t = bench(lambda: ft._pool(k, v, plan))
        say(f"causal={causal} pool windows={windows} block_t={block_t} warps={warps} "
            f"stages={stages}: {t:.4f} ms = {bytes_min / 2 / t / 1e6:.0f} GB/s")
    ft.POOL_CONFIG.update(default)
    ck, cv = ft._pool(k, v, plan)
    for bn, stages, cap in ATTENTION_TRIALS[causal]:
        cfg = dataclasses.replace(base, fwd_block_n=bn, fwd_stages=stages, fwd_maxnreg=cap)
        t = bench(lambda: ft.fma_fwd(q, k, v, causal=causal, coarse=(ck, cv), config=cfg))
        say(f"causal={causal} attention block_n={bn} stages={stages} maxnreg={cap}: {t:.4f} ms")
    t = bench(lambda: ft.fma_fwd(q, k, v, causal=causal))
    say(f"causal={causal} whole forward (default config): {t:.4f} ms "
        f"= {bytes_min / t / 1e6:.0f} GB/s")

if "prof" in modes:
    for causal in (False, True):
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        o = ft.fma_triton(qg, kg, vg, causal=causal)
        do = torch.randn_like(o)
        kernel_times(lambda: ft.fma_triton(q, k, v, causal=causal), f"causal={causal} fwd", say)
        kernel_times(
            lambda: torch.autograd.grad(ft.fma_triton(qg, kg, vg, causal=causal), (qg, kg, vg), do),
            f"causal={causal} fwd_bwd", say,
        )

if "bwd" in modes:
    # (stages, dq register cap, dk/dv register cap) of the backward kernels
    for causal in (False, True):
        base = ft.launch_config(64, causal)
        o, lse, ck, cv = ft.fma_fwd(q, k, v, causal=causal)
        do = torch.randn_like(q)
        for stages, dq_cap, dkdv_cap in ((3, None, None), (2, None, None), (3, 168, 168),
                                         (3, 128, 128), (2, 168, 168), (2, 128, 128)):
            cfg = dataclasses.replace(base, bwd_stages=stages, dq_maxnreg=dq_cap,
                                      dkdv_maxnreg=dkdv_cap)
            label = f"causal={causal} bwd stages={stages} caps={dq_cap}/{dkdv_cap}"
            t = bench(lambda: ft.fma_bwd(q, k, v, o, lse, do, ck, cv, causal=causal, config=cfg))
            say(f"{label}: {t:.4f} ms")
            kernel_times(lambda: ft.fma_bwd(q, k, v, o, lse, do, ck, cv, causal=causal,
                                            config=cfg), label, say)

if "coarse" in modes:
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)
    for width in (64, 32, 16):
        ft.COARSE_TILE[True] = width
        ft.fma_plan.cache_clear()
        t_f = bench(lambda: ft.fma_triton(q, k, v, causal=True))
        t_fb = bench(
            lambda: torch.autograd.grad(ft.fma_triton(qg, kg, vg, causal=True), (qg, kg, vg), do)
        )
        say(f"causal coarse tile {width}: fwd {t_f:.4f} ms, fwd_bwd {t_fb:.4f} ms")

if "tiles" in modes:
    for causal in (False, True):
        base = ft.launch_config(64, causal)
        for block_m, warps, stages, cap in (
            (64, 4, base.fwd_stages, base.fwd_maxnreg),
            (128, 8, 2, None),
            (128, 8, 1, None),
            (128, 8, 2, 128),
            (128, 4, 2, None),
            (128, 8, 3, None),
        ):
            cfg = dataclasses.replace(
                base, block_m=block_m, num_warps=warps, fwd_stages=stages, fwd_maxnreg=cap
            )
            t = bench(lambda: ft.fma_fwd(q, k, v, causal=causal, config=cfg))
            say(f"causal={causal} fwd block_m={block_m} warps={warps} stages={stages} "
                f"maxnreg={cap}: {t:.4f} ms")
