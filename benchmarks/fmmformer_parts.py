"""The FMMformer Triton kernels in parts on the GPU: forward, backward alone and fwd_bwd, the
state pass alone, each kernel's time (torch.profiler), under the default launch config or one
with some kernels' tiles replaced.

    python benchmarks/fmmformer_parts.py [--bandwidth 30] [--kernels 3] [--profile]
        [--tiles KIND=BLOCK_M,BLOCK_N,WARPS,STAGES[,MAXNREG] ...] [--set FIELD=INT ...]

KIND is an `FMMConfig` kernel (state, fwd, bwd_dq, bwd_dkdv, band_causal, far_causal,
far_causal_inference, far_bwd_q, far_bwd_kv, band_bwd_q, band_bwd_kv); FIELD one of its
integer fields (e.g. far_programs_per_sm=2).
"""
from __future__ import annotations

import dataclasses

import torch
from common import Log, cuda_device, fail, fmt_time, kernel_times, shape_parser, shapes, time_ms

from variants.fmmformer_triton import FMMConfig, KernelConfig, fmm_config, fmmformer_triton
from variants.fmmformer_triton.backward import fmmformer_bwd
from variants.fmmformer_triton.forward import fmmformer_fwd
from variants.fmmformer_triton.states import state_chunk_rows, state_pass


def configured(base: FMMConfig, tiles: list[str], fields: list[str]) -> FMMConfig:
    """`base` with the kernels' tiles and integer fields the command line replaces."""
    changes = {}
    try:
        for item in tiles:
            kind, _, values = item.partition("=")
            numbers = [int(x) for x in values.split(",")]
            known = isinstance(getattr(base, kind, None), KernelConfig)
            if not known or len(numbers) not in (4, 5):
                raise ValueError(item)
            changes[kind] = dataclasses.replace(
                getattr(base, kind), block_m=numbers[0], block_n=numbers[1],
                num_warps=numbers[2], num_stages=numbers[3],
                maxnreg=numbers[4] if len(numbers) == 5 else None)
        for item in fields:
            name, _, value = item.partition("=")
            if not isinstance(getattr(base, name, None), int):
                raise ValueError(item)
            changes[name] = int(value)
    except ValueError as exc:
        fail(f"bad --tiles/--set '{exc}'; see --help for the kinds and fields")
    return dataclasses.replace(base, **changes)


def main() -> None:
    parser = shape_parser(__doc__.splitlines()[0])
    parser.add_argument("--bandwidth", type=int, default=30)
    parser.add_argument("--kernels", type=int, choices=(1, 2, 3), default=3)
    parser.add_argument("--tiles", action="append", default=[])
    parser.add_argument("--set", action="append", default=[], dest="fields")
    parser.add_argument("--profile", action="store_true", help="each kernel's time")
    args = parser.parse_args()
    device, log = cuda_device(), Log(args.log)
    r, k = args.kernels, args.bandwidth
    for shape in shapes(args):
        cfg = configured(fmm_config(shape.head_dim, device), args.tiles, args.fields)
        log(f"{torch.cuda.get_device_name()} {shape} k={k} r={r}\n  {cfg.describe(shape.causal)}")
        gen = torch.Generator().manual_seed(0)
        dims = (shape.batch, shape.heads, shape.seq_len, shape.head_dim)
        q, kk, v, do = (torch.randn(dims, generator=gen).to(device, shape.dtype) for _ in range(4))
        wn = wf = torch.full((shape.heads,), 0.5, device=device)
        leaves = [t.clone().requires_grad_() for t in (q, kk, v, wn, wf)]
        causal = shape.causal

        def fwd():
            return fmmformer_fwd(q, kk, v, wn, wf, k, r, causal, config=cfg)[0]

        def fwd_bwd():
            fmmformer_triton(*leaves, bandwidth=k, kernels=r, causal=causal,
                             config=cfg).backward(do)

        saved = fmmformer_fwd(q, kk, v, wn, wf, k, r, causal, save=True, config=cfg)[1]

        def bwd():
            return fmmformer_bwd(q, kk, v, saved, do, wn, wf, k, r, causal, config=cfg)

        with torch.no_grad():
            log(f"  fwd      {fmt_time(time_ms(fwd, device))}")
            log(f"  bwd      {fmt_time(time_ms(bwd, device))}")
        log(f"  fwd_bwd  {fmt_time(time_ms(fwd_bwd, device, leaves))}")
        if not causal:
            rows = state_chunk_rows(shape.seq_len, shape.batch * shape.heads, r, shape.head_dim,
                                    q.numel() * q.element_size(), cfg)
            with torch.no_grad():
                stats = time_ms(lambda: state_pass(kk, v, r, False, rows, cfg), device)
            log(f"  state pass alone {fmt_time(stats)}, {-(-shape.seq_len // rows)} chunks")
        if args.profile:
            with torch.no_grad():
                kernel_times(fwd, "fwd", log)
            kernel_times(fwd_bwd, "fwd_bwd", log)


if __name__ == "__main__":
    main()
