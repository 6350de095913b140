"""Pieces of the FMMformer kernels on the GPU (bf16, H=16, N=65536, D=64, k=30), in isolation.

    python scripts/fmm_probe.py [maps] [state] [regs] [fwd] [prof] [bwd] [wstate] [cfwd] [cinf]
        [cpass]

maps: marginal cost of each far-field map (state pass and main kernel at r = 1, 2, 3).
state: state-pass configs (rows per tile, warps, stages). regs: register caps (`maxnreg`) per
kernel. fwd: the non-causal forward under register caps and stages. prof: the time of each kernel
of the forward and the backward (torch.profiler). bwd: warps and stages of the non-causal
backward kernels. wstate: the backward's weighted (dual) state pass alone per config. cfwd:
the causal forward's tile heights, warps and stages. cinf: causal inference, map passes against
the fused walk. cpass: the causal backward's passes (time, profile, fwd_bwd), then configs of
its walks and band kernels, and the forward's chunk count they walk. (The per-tile causal
backward they replaced was compared here at 200bd83: `cpass` in fmmformer_triton_logs.)
Results go to $OUT/probe.log.
"""

import dataclasses
import sys

sys.path.insert(0, ".")
sys.path.insert(0, "scripts")
import torch  # noqa: E402

import variants.fmmformer_triton as fmt  # noqa: E402
from probe_common import ProbeLog, bench, kernel_times  # noqa: E402
from variants.window_triton import window_attention_triton  # noqa: E402

say = ProbeLog("probe.log").say


dev, dt = "cuda", torch.bfloat16
h, n, d, k = 16, 65536, 64, 30
q, kk, v = (torch.randn(1, h, n, d, device=dev, dtype=dt) for _ in range(3))
do = torch.randn_like(q)
wn = torch.full((h,), 0.5, device=dev)
wf = wn.clone()
o_bytes = q.numel() * 2


def state_rows(r, causal):
    pick = fmt._causal_chunk_rows if causal else fmt._state_chunk_rows
    return pick(n, h, r, d, o_bytes, q.device)


def fwd(r, causal, save=False):
    return fmt.fmmformer_fwd(q, kk, v, wn, wf, k, r, causal, save=save)


def bwd(saved, r, causal):
    return fmt.fmmformer_bwd(q, kk, v, saved, do, wn, wf, k, r, causal)


modes = sys.argv[1:] or ["maps"]
if "maps" in modes:
    say(
        "window_triton fwd",
        round(bench(lambda: window_attention_triton(q, kk, v, bandwidth=k, causal=False)), 4),
    )
    for causal in (False, True):
        for r in (1, 2, 3):
            rows = state_rows(r, causal)
            t_state = bench(lambda: fmt._state_pass(kk, v, r, causal, rows))
            t_all = bench(lambda: fwd(r, causal))
            say(
                f"causal={causal} r={r}: state pass {t_state:.4f} ms, fwd {t_all:.4f} ms, "
                f"main ~{t_all - t_state:.4f} ms, chunk rows {rows}"
            )

if "state" in modes:
    default = fmt.CONFIGS["state"][d]
    for block, warps, stages in ((64, 4, 3), (32, 4, 2), (32, 8, 3), (16, 4, 3), (64, 4, 2)):
        fmt.CONFIGS["state"][d] = fmt.KernelConfig(block, 64, warps, stages)
        rows = state_rows(3, False)
        t = bench(lambda: fmt._state_pass(kk, v, 3, False, rows))
        say(f"state block={block} warps={warps} stages={stages}: {t:.4f} ms (chunk rows {rows})")
    fmt.CONFIGS["state"][d] = default

if "regs" in modes:
    # What each kernel's time is measured by: the state pass alone, the whole forward, or the
    # backward alone (its state pass included).
    saved = {c: fwd(3, c, save=True)[1] for c in (False, True)}
    pieces = {
        "state": lambda: fmt._state_pass(kk, v, 3, False, state_rows(3, False)),
        "fwd": lambda: fwd(3, False),
        "fwd_causal": lambda: fwd(3, True),
        "bwd_dq": lambda: bwd(saved[False], 3, False),
        "bwd_dkdv": lambda: bwd(saved[False], 3, False),
    }
    trials = {kind: (None, 232, 200, 168) for kind in pieces}
    trials["fwd_causal"] = (None, 200, 168, 128)
    for kind, run in pieces.items():
        default = fmt.CONFIGS[kind][d]
        warps = (default.num_warps, 4) if kind == "fwd_causal" else (default.num_warps,)
        for w in warps:
            for cap in trials[kind]:
                fmt.CONFIGS[kind][d] = dataclasses.replace(default, num_warps=w, maxnreg=cap)
                try:
                    say(f"regs {kind} warps={w} maxnreg={cap}: {bench(run):.4f} ms")
                except Exception as e:  # a cap the compiler refuses
                    say(f"regs {kind} warps={w} maxnreg={cap}: failed {type(e).__name__}: {e}")
        fmt.CONFIGS[kind][d] = default

if "fwd" in modes:
    default = fmt.CONFIGS["fwd"][d]
    for stages in (1, 2):
        for cap in (None, 168, 128, 112):
            fmt.CONFIGS["fwd"][d] = dataclasses.replace(default, num_stages=stages, maxnreg=cap)
            say(f"fwd stages={stages} maxnreg={cap}: {bench(lambda: fwd(3, False)):.4f} ms")
    fmt.CONFIGS["fwd"][d] = default

if "prof" in modes:
    for causal in (False, True):
        saved = fwd(3, causal, save=True)[1]
        kernel_times(lambda: fwd(3, causal), f"causal={causal} fwd", say)
        kernel_times(lambda: bwd(saved, 3, causal), f"causal={causal} bwd", say)

if "bwd" in modes:
    saved = fwd(3, False, save=True)[1]
    for kind in ("bwd_dq", "bwd_dkdv"):
        default = fmt.CONFIGS[kind][d]
        for warps, stages in ((4, 2), (8, 2), (4, 1), (8, 1), (4, 3)):
            fmt.CONFIGS[kind][d] = dataclasses.replace(default, num_warps=warps, num_stages=stages)
            t = bench(lambda: bwd(saved, 3, False))
            say(f"bwd {kind} warps={warps} stages={stages}: backward alone {t:.4f} ms")
        fmt.CONFIGS[kind][d] = default

if "wstate" in modes:
    # Normalizers and their gradients as the dq kernel leaves them (values do not matter here).
    den = torch.rand(h, 3, n, device=dev) + 1.0
    dden = torch.randn(h, 3, n, device=dev)
    rows = state_rows(3, False)
    default = fmt.CONFIGS["state"][d]
    # (32 value columns faulted with an illegal address on the H100 and ended the probe:
    # probe_wstate_near_drop.log.)
    for block, warps, stages, block_v in ((64, 4, 3, 64), (64, 4, 2, 64), (64, 8, 3, 64),
                                          (32, 4, 3, 64), (128, 8, 2, 64), (64, 4, 4, 64)):
        fmt.CONFIGS["state"][d] = fmt.KernelConfig(block, 64, warps, stages, 1, block_v)
        t = bench(lambda: fmt._state_pass(q, do, 3, False, rows, weights=(den, dden, wn)))
        say(f"weighted state block={block} warps={warps} stages={stages} block_v={block_v}: "
            f"{t:.4f} ms")
    fmt.CONFIGS["state"][d] = default

if "cfwd" in modes:
    # The causal forward walker's tile heights, warps and stages (32-row tiles halve every
    # tile a thread holds but the three states; twice the steps).
    default = fmt.CONFIGS["fwd_causal"][d]
    for block_m, block_n, warps, stages in ((64, 64, 8, 1), (32, 64, 8, 1), (32, 32, 8, 1),
                                            (32, 64, 4, 1), (32, 32, 4, 1), (32, 64, 4, 2),
                                            (32, 64, 8, 2)):
        fmt.CONFIGS["fwd_causal"][d] = fmt.KernelConfig(block_m, block_n, warps, stages)
        try:
            say(f"cfwd block_m={block_m} block_n={block_n} warps={warps} stages={stages}: "
                f"{bench(lambda: fwd(3, True)):.4f} ms")
        except Exception as e:  # a config that fails to compile or to run
            say(f"cfwd block_m={block_m} block_n={block_n} warps={warps} stages={stages}: "
                f"failed {type(e).__name__}: {e}")
    fmt.CONFIGS["fwd_causal"][d] = default

if "cinf" in modes:
    # Causal inference: the band pass and one pass per far-field map against the fused walk;
    # a profile, configs of the two passes, programs per SM, and the two outputs' difference.
    for passes in (True, False):
        fmt.CAUSAL_MAP_PASSES = passes
        say(f"cinf map_passes={passes}: causal fwd {bench(lambda: fwd(3, True)):.4f} ms")
    fmt.CAUSAL_MAP_PASSES = True
    kernel_times(lambda: fwd(3, True), "cinf map passes", say)
    o_fused = fmt.fmmformer_fwd(q, kk, v, wn, wf, k, 3, True, save=True)[0]
    o_pass = fwd(3, True)[0]
    diff = ((o_pass.float() - o_fused.float()).norm() / o_fused.float().norm()).item()
    say(f"cinf rel diff map passes vs fused walk (bf16 o): {diff:.2e}")
    for kind, trials in (("far_causal", ((4, 1), (4, 2), (4, 3), (8, 2))),
                         ("band_causal", ((4, 1), (4, 3), (8, 2)))):
        default = fmt.CONFIGS[kind][d]
        for warps, stages in trials:
            fmt.CONFIGS[kind][d] = dataclasses.replace(default, num_warps=warps, num_stages=stages)
            say(f"cinf {kind} warps={warps} stages={stages}: {bench(lambda: fwd(3, True)):.4f} ms")
        fmt.CONFIGS[kind][d] = default
    for per_sm in (2, 8, 16):
        fmt.FAR_PROGRAMS_PER_SM, default = per_sm, fmt.FAR_PROGRAMS_PER_SM
        say(f"cinf far programs per SM {per_sm}: {bench(lambda: fwd(3, True)):.4f} ms")
        fmt.FAR_PROGRAMS_PER_SM = default

if "cpass" in modes:
    # Causal backward in passes (a query-side and a key-side walk per map, then the band):
    # time, profile, configs of its kernels, and the forward's chunks it walks.
    saved = fwd(3, True, save=True)[1]
    say(f"cpass: causal backward alone {bench(lambda: bwd(saved, 3, True)):.4f} ms")
    kernel_times(lambda: bwd(saved, 3, True), "cpass", say)
    say(f"cpass fwd_bwd: {bench(lambda: bwd(fwd(3, True, save=True)[1], 3, True)):.4f} ms")
    for kind, trials in (("far_bwd_q", ((4, 1), (4, 3), (8, 2), (8, 1))),
                         ("far_bwd_kv", ((4, 1), (4, 3), (8, 2), (8, 1))),
                         ("band_bwd_q", ((4, 1), (8, 2))), ("band_bwd_kv", ((4, 1), (8, 2)))):
        default = fmt.CONFIGS[kind][d]
        for warps, stages in trials:
            fmt.CONFIGS[kind][d] = dataclasses.replace(default, num_warps=warps, num_stages=stages)
            try:
                t = bench(lambda: bwd(saved, 3, True))
                say(f"cpass {kind} warps={warps} stages={stages}: backward alone {t:.4f} ms")
            except Exception as e:  # a config that fails to compile or to run
                say(f"cpass {kind} warps={warps} stages={stages}: failed {type(e).__name__}: {e}")
        fmt.CONFIGS[kind][d] = default
    # The band kernels' tile heights (keys or queries a program takes, and of the inner tiles).
    for kind in ("band_bwd_q", "band_bwd_kv"):
        default = fmt.CONFIGS[kind][d]
        for block_m, block_n, warps, stages in ((32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2),
                                                (128, 64, 8, 2), (128, 32, 8, 2)):
            fmt.CONFIGS[kind][d] = fmt.KernelConfig(block_m, block_n, warps, stages)
            t = bench(lambda: bwd(saved, 3, True))
            say(f"cpass {kind} block_m={block_m} block_n={block_n} warps={warps} "
                f"stages={stages}: backward alone {t:.4f} ms")
        fmt.CONFIGS[kind][d] = default
    for per_sm in (2, 8):
        fmt.FAR_PROGRAMS_PER_SM, default = per_sm, fmt.FAR_PROGRAMS_PER_SM
        s2 = fwd(3, True, save=True)[1]
        say(f"cpass chunks for {per_sm} programs per SM: backward alone "
            f"{bench(lambda: bwd(s2, 3, True)):.4f} ms")
        fmt.FAR_PROGRAMS_PER_SM = default
