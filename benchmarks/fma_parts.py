"""The FMA Triton kernels in parts on the GPU: the pooling pass alone, the attention kernel
alone (summaries given), the whole forward, the backward alone and fwd_bwd, and each kernel's
time (torch.profiler), under the default launch config or one with some fields replaced.

    python benchmarks/fma_parts.py [--m 64] [--p 2] [--profile] [--set FIELD=INT ...]

FIELD is a `LaunchConfig` field (block_m, fwd_block_n, bwd_block_n, dkdv_m, num_warps,
fwd_stages, bwd_stages, fwd_maxnreg, dq_maxnreg, dkdv_maxnreg, coarse_tile, pool_windows,
pool_block_t, pool_warps, pool_stages); `FIELD=none` lifts a register cap.
"""
from __future__ import annotations

import dataclasses

import torch
from common import Log, cuda_device, fail, fmt_time, kernel_times, shape_parser, shapes, time_ms

from variants.fma_triton import LaunchConfig, fma_bwd, fma_config, fma_fwd, fma_plan, fma_triton
from variants.fma_triton.pool import pool


def configured(base: LaunchConfig, fields: list[str]) -> LaunchConfig:
    """`base` with the fields the command line replaces."""
    names = {f.name for f in dataclasses.fields(LaunchConfig)}
    changes = {}
    for item in fields:
        name, _, value = item.partition("=")
        if name not in names or not (value.isdigit() or value == "none"):
            fail(f"bad --set '{item}'; valid fields: {', '.join(sorted(names))}")
        changes[name] = None if value == "none" else int(value)
    return dataclasses.replace(base, **changes)


def main() -> None:
    parser = shape_parser(__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--p", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], dest="fields")
    parser.add_argument("--profile", action="store_true", help="each kernel's time")
    args = parser.parse_args()
    device, log = cuda_device(), Log(args.log)
    for shape in shapes(args):
        causal = shape.causal
        cfg = configured(fma_config(args.m, causal, shape.head_dim, device), args.fields)
        opts = dict(m=args.m, p=args.p, causal=causal)
        log(f"{torch.cuda.get_device_name()} {shape} m={args.m} p={args.p}\n  {cfg}")
        gen = torch.Generator().manual_seed(0)
        dims = (shape.batch, shape.heads, shape.seq_len, shape.head_dim)
        q, k, v, do = (torch.randn(dims, generator=gen).to(device, shape.dtype) for _ in range(4))
        plan = fma_plan(shape.seq_len, args.m, args.p, causal, True, False, cfg.block_m,
                        cfg.coarse_tile, str(device))
        with torch.no_grad():
            coarse = pool(k, v, plan, cfg)
            o, lse, ck, cv = fma_fwd(q, k, v, config=cfg, **opts)
            parts = {
                "pool": lambda: pool(k, v, plan, cfg),
                "attention": lambda: fma_fwd(q, k, v, coarse=coarse, config=cfg, **opts),
                "fwd": lambda: fma_fwd(q, k, v, config=cfg, **opts),
                "bwd": lambda: fma_bwd(q, k, v, o, lse, do, ck, cv, config=cfg, **opts),
            }
            for name, fn in parts.items():
                log(f"  {name:9} {fmt_time(time_ms(fn, device))}")
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]

        def fwd_bwd():
            fma_triton(*leaves, config=cfg, **opts).backward(do)

        log(f"  fwd_bwd   {fmt_time(time_ms(fwd_bwd, device, leaves))}")
        if args.profile:
            with torch.no_grad():
                kernel_times(parts["fwd"], "fwd", log)
            kernel_times(fwd_bwd, "fwd_bwd", log)


if __name__ == "__main__":
    main()
