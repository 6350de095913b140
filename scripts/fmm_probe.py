"""Marginal cost of each far-field map in the FMMformer kernels (bf16, H=16, N=65536, D=64)."""
import os, sys
sys.path.insert(0, ".")
import torch, triton
import variants.fmmformer_triton as fmt
from variants.window_triton import window_attention_triton

out = os.environ.get("OUT", "/tmp")
log = open(f"{out}/probe.log", "w")
def say(*a):
    s = " ".join(map(str, a)); print(s, flush=True); log.write(s + "\n"); log.flush()
dev, dt = "cuda", torch.bfloat16
h, n, d, k = 16, 65536, 64, 30
q, kk, v = (torch.randn(1, h, n, d, device=dev, dtype=dt) for _ in range(3))
wn = torch.full((h,), 0.5, device=dev); wf = wn.clone()
ZDOT_TRIALS = (True,)
bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=100)
say("window_triton fwd", round(bench(lambda: window_attention_triton(q, kk, v, bandwidth=k, causal=False)), 4))
for zdot, causal, r in [(z, c, r) for z in ZDOT_TRIALS for c in (False, True) for r in (1, 2, 3)]:
    fmt.Z_BY_DOT = zdot
    if True:
        o_bytes = q.numel() * 2
        rows = (fmt._causal_chunk_rows if causal else fmt._state_chunk_rows)(n, h, r, d, o_bytes, q.device)
        t_state = bench(lambda: fmt._state_pass(kk, v, r, causal, rows))
        t_all = bench(lambda: fmt.fmmformer_fwd(q, kk, v, wn, wf, k, r, causal))
        say(f"z_by_dot={zdot} causal={causal} r={r}: state pass {t_state:.4f} ms, fwd {t_all:.4f} ms, main ~{t_all - t_state:.4f} ms, chunk rows {rows}")
# State pass configs (non-causal, r=3): rows per tile, warps, stages, value columns.
CONFIG_TRIALS = ((64, 4, 3, 64), (32, 4, 3, 64), (32, 4, 2, 64), (32, 4, 4, 64), (32, 2, 3, 64),
                 (16, 4, 3, 64), (16, 2, 3, 64), (32, 8, 3, 64))
default = fmt.CONFIGS["state"][d]
for zdot in (True,):
    fmt.Z_BY_DOT = zdot
    for block, warps, stages, bv in CONFIG_TRIALS:
        fmt.CONFIGS["state"][d] = fmt.KernelConfig(block, 64, warps, stages, block_v=bv)
        rows = fmt._state_chunk_rows(n, h, 3, d, q.numel() * 2, q.device)
        t_state = bench(lambda: fmt._state_pass(kk, v, 3, False, rows))
        say(f"state z_by_dot={zdot} block={block} warps={warps} stages={stages} block_v={bv}: {t_state:.4f} ms (chunk rows {rows})")
fmt.CONFIGS["state"][d] = default
