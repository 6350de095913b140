#!/usr/bin/env python3
"""attnbench command line: run a sweep, list what is registered, or make reports.

    python run_bench.py                      # quick sweep on whatever device is here
    python run_bench.py --list               # variants, suites, presets, parameters
    python run_bench.py --preset fig6        # the FMMformer scaling figure, 2^10..2^16
    python run_bench.py plot RUN_DIR         # figures from a results CSV
    python run_bench.py compare OLD NEW      # regressions between two runs
    python run_bench.py report RUN_DIR       # claim check, slopes, crossovers
    python run_bench.py targets RUN_DIR      # the kernel performance targets
    python run_bench.py --inputs minilm      # q, k, v of a real model's attention
    python run_bench.py capture --model DIR --text FILE --seq-len N --out QKV.safetensors
    python run_bench.py dropin | lowrank | quality   # real-attention quality (harness.realcli)
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.config import DTYPES, MODES, PRESETS, BenchConfig, ConfigError, default_device
from harness.config import preset_config, validate, with_overrides
from harness.inputs import CHOICES as INPUT_CHOICES
from harness.inputs import default_lengths
from harness.interpret import widen_bf16_dots
from harness.registry import RegistryError, all_variants
from harness.results import ResultsError, load_results, read_meta
from harness.runner import Sweep, new_run_dir
from harness.summary import summary_tables
from suites import SUITES
from variants import load_builtin_variants

REPORT_COMMANDS = ("plot", "compare", "report", "targets")
REAL_COMMANDS = ("capture", "dropin", "lowrank", "quality")  # harness.realcli
DEFAULT_ROOT = Path(__file__).resolve().parent / "results" / "runs"


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad input on one line and exits 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def csv_list(kind):
    def parse(text: str):
        try:
            return tuple(kind(item) for item in text.split(",") if item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of {kind.__name__}, got '{text}'")

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="run_bench.py", description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="list variants, suites, presets and exit")
    p.add_argument("--preset", help=f"named configuration: {', '.join(PRESETS)} (default quick)")
    p.add_argument("--variant", type=csv_list(str), help="comma list of variants (default: all)")
    p.add_argument("--suite", type=csv_list(str), help=f"comma list of {', '.join(SUITES)}")
    p.add_argument("--mode", type=csv_list(str), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--seq-lens", type=csv_list(int), help="comma list of sequence lengths")
    p.add_argument("--batch", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--dtype", choices=tuple(DTYPES))
    causal = p.add_mutually_exclusive_group()
    causal.add_argument("--causal", action="store_const", const=(True,), dest="causal",
                        help="causal only (default: both)")
    causal.add_argument("--non-causal", action="store_const", const=(False,), dest="causal",
                        help="non-causal only")
    p.add_argument("--param", action="append", default=[], metavar="VARIANT.PARAM=VALUE[,VALUE]",
                   help="set (or sweep, with a comma list) a variant parameter")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                   help="a Python file whose @register_variant variants join the run")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present")
    p.add_argument("--out", type=Path, help="run directory (default results/runs/<run_id>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="finish an interrupted run")
    p.add_argument("--rep-ms", type=float, help="measuring budget per timed case (ms)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time each case as a CUDA-graph replay (GPU time without the Python "
                        "launch path, which dominates short calls)")
    p.add_argument("--accuracy-rows", type=int, help="query rows sampled for references")
    p.add_argument("--seed", type=int)
    p.add_argument("--inputs", type=csv_list(str), metavar="SOURCE[,SOURCE]",
                   help="where q, k, v come from: randn (default), minilm (a real model's "
                        "attention, N <= 512), file:PATH (from `run_bench.py capture`)")
    return p


def load_plugins(paths) -> None:
    """Import each plugin file; its @register_variant calls add variants to the registry."""
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"plugin file not found: {path}")
        spec = importlib.util.spec_from_file_location(f"attnbench_plugin_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


def print_listing(console: Console, device: str) -> None:
    import torch

    table = Table(title=f"variants (availability on {device})", title_justify="left")
    for col in ("name", "family", "causal", "params (defaults)", "on " + device):
        table.add_column(col)
    for spec in all_variants():
        forms = "/".join("causal" if c else "non-causal" for c in spec.causal)
        params = ", ".join(f"{k}={v}" for k, v in spec.params.items()) or "-"
        reason = spec.unavailable_reason(torch.device(device))
        table.add_row(spec.name, spec.family, forms, escape(params), "yes" if reason is None else escape(reason))
    console.print(table)
    console.print(f"suites: {', '.join(SUITES)}")
    console.print(f"modes: {', '.join(MODES)}")
    console.print(f"presets: {', '.join(PRESETS)}")
    console.print(f"dtypes: {', '.join(DTYPES)}")
    console.print(f"inputs: {', '.join(INPUT_CHOICES)}")


def config_from_args(args) -> tuple[BenchConfig, Path]:
    """The run's configuration and directory, from a preset, overrides, or a resumed run."""
    if args.resume:
        meta = read_meta(args.resume)
        if "config" not in meta:
            raise ConfigError(f"cannot resume {args.resume}: no meta.json with a config")
        config = BenchConfig.from_dict(meta["config"])
        validate(config)  # e.g. a CUDA run cannot be resumed on a CPU-only machine
        return config, args.resume
    device = args.device or default_device()
    seq_lens = args.seq_lens
    if seq_lens is None and args.inputs and "randn" not in args.inputs:
        seq_lens = default_lengths(args.inputs)  # the preset's lengths may exceed a capture's
    config = with_overrides(
        preset_config(args.preset or "quick", device),
        variants=args.variant, suites=args.suite, modes=args.mode, seq_lens=seq_lens,
        batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype,
        causal=args.causal, params=tuple(args.param) or None, plugins=tuple(args.plugin) or None,
        rep_ms=args.rep_ms, accuracy_rows=args.accuracy_rows, seed=args.seed,
        cuda_graph=args.cuda_graph or None, inputs=args.inputs,
    )  # fmt: skip
    return config, args.out or new_run_dir(DEFAULT_ROOT, config)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        if argv and argv[0] in REPORT_COMMANDS:
            from harness.reports.cli import main as reports_main

            return reports_main(argv)
        if argv and argv[0] in REAL_COMMANDS:
            from harness.realcli import main as real_main

            return real_main(argv)
        args = build_parser().parse_args(argv)
        widen_bf16_dots()  # CPU runs of Triton kernels: the interpreter's bf16 dot is wrong
        load_builtin_variants()
        load_plugins(args.plugin)
        if args.list:
            print_listing(console, args.device or default_device())
            return 0
        config, run_dir = config_from_args(args)
        if args.resume:
            load_plugins(config.plugins)
        Sweep(config, run_dir).run(["run_bench.py", *argv])
        for table in summary_tables(load_results(run_dir)):
            console.print(table)
        console.print(f"results: {run_dir / 'results.csv'}")
        return 0
    except (RegistryError, ConfigError, ResultsError) as exc:
        print(f"run_bench.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
