"""Registers and spill stack of the FMMformer kernels built for sm_90, on any machine.

Triton compiles for an H100 target without a GPU; cuobjdump (shipped with Triton) reads the
cubin's resource usage. A spill shows up as STACK > 0.
    python scripts/sm90_resources.py [kernel names, e.g. fwd far_bwd_q]
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, ".")
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import variants.fmmformer_triton as fmt  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
BF16, F32, C = "*bf16", "*fp32", "constexpr"


def usage(fn, signature: dict, constants: dict, options: dict) -> str:
    """REG and STACK of `fn` compiled for sm_90 with these constants and launch options."""
    source = ASTSource(fn=fn, signature=signature, constexprs=constants)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin.name],
                              capture_output=True, text=True, check=True).stdout
    return " ".join(re.findall(r"(REG:\d+|STACK:\d+)", dump))


def main() -> None:
    pointers = dict(Q=BF16, K=BF16, V=BF16, O=BF16, LSE=F32, PZ=F32, WN=F32, WF=F32)
    scalars = dict(N="i32", H="i32", bandwidth="i32")
    tail = dict(qk_scale="fp32", eps="fp32", R=C, SAVE=C, LOWP=C, BLOCK_M=C, BLOCK_N=C, D=C,
                DOT_PREC=C)
    base = dict(R=3, SAVE=False, LOWP=True, BLOCK_M=64, BLOCK_N=64, D=64, DOT_PREC="tf32")
    state_sig = dict(A=BF16, B=BF16, WB=F32, WZ=F32, WF=F32, P=F32, PZ=F32, N="i32", H="i32",
                     rows_per_chunk="i32", R=C, WEIGHTED=C, LOWP=C, BLOCK=C, BLOCK_V=C, D=C,
                     DOT_PREC=C)
    fwd_sig = {**pointers, "P": BF16, **scalars, **tail, "TILES": C, "BLOCK_V": C}
    causal_sig = {**pointers, "P": F32, **scalars, "rows_per_program": "i32", **tail}
    runs = [
        ("state", fmt._fmmformer_state_kernel, state_sig,
         dict(R=3, WEIGHTED=False, LOWP=True, BLOCK=64, BLOCK_V=64, D=64, DOT_PREC="tf32")),
        ("fwd", fmt._fmmformer_fwd_kernel, fwd_sig, {**base, "TILES": 1, "BLOCK_V": 64}),
        ("fwd_causal", fmt._fmmformer_fwd_causal_kernel, causal_sig, base),
    ]
    consts = dict(R=C, LOWP=C, BLOCK_M=C, BLOCK_N=C, D=C, DOT_PREC=C)
    bwd_base = dict(R=3, LOWP=True, BLOCK_M=64, BLOCK_N=64, D=64, DOT_PREC="tf32")
    bwd_scalars = {**scalars, "rows_per_program": "i32"}
    dq_sig = dict(Q=BF16, K=BF16, V=BF16, O=BF16, DO=BF16, LSE=F32, DELTA=F32, DEN=F32, DDEN=F32,
                  DQ=BF16, DW=F32, P=BF16, PZ=F32, WN=F32, WF=F32, **bwd_scalars,
                  qk_scale="fp32", sm_scale="fp32", eps="fp32", **consts)
    dkdv_sig = dict(Q=BF16, K=BF16, V=BF16, DO=BF16, LSE=F32, DELTA=F32, DEN=F32, DDEN=F32,
                    DK=BF16, DV=BF16, U=BF16, UZ=F32, WN=F32, WF=F32, **bwd_scalars,
                    qk_scale="fp32", sm_scale="fp32", **consts)
    walk = dict(N="i32", H="i32", rows_per_chunk="i32")
    walk_consts = dict(MAP=C, FIRST=C, LOWP=C, BLOCK_M=C, D=C, DOT_PREC=C)
    far_q_sig = dict(Q=BF16, K=BF16, V=BF16, DO=BF16, DQ=BF16, DFAR=F32, DEN=F32, DDEN=F32,
                     P=F32, PZ=F32, U=F32, UZ=F32, WF=F32, **walk, eps="fp32", R=C,
                     **walk_consts)
    far_kv_sig = dict(Q=BF16, K=BF16, V=BF16, DO=BF16, DK=BF16, DV=BF16, DEN=F32, DDEN=F32,
                      U=F32, UZ=F32, WF=F32, **walk, **walk_consts)
    walk_base = dict(MAP=2, FIRST=False, LOWP=True, BLOCK_M=64, D=64, DOT_PREC="tf32")
    runs += [
        ("bwd_dq", fmt._fmmformer_bwd_dq_kernel, dq_sig, bwd_base),
        ("bwd_dkdv", fmt._fmmformer_bwd_dkdv_kernel, dkdv_sig, bwd_base),
        ("far_bwd_q", fmt._fmmformer_far_bwd_q_kernel, far_q_sig, {**walk_base, "R": 3}),
        ("far_bwd_kv", fmt._fmmformer_far_bwd_kv_kernel, far_kv_sig, walk_base),
    ]
    only = set(sys.argv[1:])
    for name, fn, signature, constants in runs:
        if only and name not in only:
            continue
        default = fmt.CONFIGS[name][64]  # the launch options the H100 runs use
        for warps in sorted({default.num_warps, 4, 8}):
            options = {**default.launch(), "num_warps": warps}
            print(f"{name:11} D=64 bf16 r=3, {options}: "
                  f"{usage(fn, signature, constants, options)}", flush=True)


if __name__ == "__main__":
    main()
