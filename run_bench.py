#!/usr/bin/env python3
"""attnbench command line: run a sweep, list what is registered, or make reports.

    python run_bench.py                      # quick sweep on whatever device is here
    python run_bench.py --list               # variants, suites, presets, parameters
    python run_bench.py --preset fig6        # the FMMformer scaling figure, 2^10..2^16
    python run_bench.py --resume RUN_DIR     # finish an interrupted run
    torchrun --nproc-per-node 8 run_bench.py --out RUN_DIR   # one sweep over 8 GPUs
    python run_bench.py --shard I/N --out RUN_DIR            # share I of N (a job array)
    python run_bench.py plot RUN_DIR         # figures from a results CSV
    python run_bench.py compare OLD NEW      # regressions between two runs
    python run_bench.py report RUN_DIR       # slopes, crossovers, the studies' tables
    python run_bench.py targets RUN_DIR      # the FMMformer study's kernel targets
    python run_bench.py --inputs minilm      # q, k, v of a real model's attention
    python run_bench.py --suite task --task mqar,listops,charlm --seeds 3   # trained quality
    python run_bench.py capture --model DIR --text FILE --seq-len N --out QKV.safetensors
    python run_bench.py dropin | quality     # real-attention quality (harness.realcli)
    python run_bench.py lowrank --out RUN_DIR   # the FMMformer study's low-rank claim
    python run_bench.py tasks RUN_DIR        # quality table, claim check, plots of a task run

`python run_bench.py plot|compare|report|targets|lowrank --help` describes each report command.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.config import (
    DTYPES,
    PRESETS,
    BenchConfig,
    ConfigError,
    RunOptions,
    default_device,
    flag,
    preset_config,
    validate,
    validate_options,
    with_overrides,
)
from harness.estimate import size_warning
from harness.inputs import CHOICES as INPUT_CHOICES
from harness.inputs import absolute_spec, changed_input_file, default_lengths
from harness.plugins import load_plugins, plugin_path
from harness.registry import RegistryError, all_variants
from harness.results import (
    META_FILE,
    RESULTS_FILE,
    ResultsError,
    finished_case_keys,
    load_existing,
    load_results,
    read_meta,
)
from harness.runner import new_run_dir
from harness.sharding import current_shard, parse_shard, pin_gpu, stop_on_sigterm
from harness.shardrun import ShardedSweep, make_sweep, require_run_dir
from harness.suite import MODES, SuiteError, all_suites, suite_names
from harness.summary import summary_tables
from harness.usage import OneLineParser, UsageError, usage_error
from studies import load_studies
from suites import load_builtin_suites
from variants import load_builtin_variants

REAL_COMMANDS = ("capture", "dropin", "quality")  # harness.realcli
# Commands handled outside harness.reports.cli, named in its list of commands.
OTHER_COMMANDS = {
    "tasks": "quality table, claim check and plots of a task run",
    "capture": "capture q, k, v of every attention layer of a model",
    "dropin": "MiniLM with each variant as its attention",
    "quality": "quality tables and plots on real attention",
}
DEFAULT_ROOT = Path(__file__).resolve().parent / "results" / "runs"


def csv_list(kind):
    """argparse type: a comma list of `kind`, a repeated value kept once (first place)."""
    def parse(text: str):
        try:
            return tuple(dict.fromkeys(kind(item) for item in text.split(",") if item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of {kind.__name__}, got '{text}'")

    return parse


def number(kind):
    """argparse type: an int or a finite float, as one-line errors."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="run_bench.py", description=__doc__.split("\n\n")[0],
                      epilog=__doc__.split("\n\n", 1)[1],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list variants, suites, presets and exit")
    p.add_argument("--preset", help=f"named configuration: {', '.join(PRESETS)} (default quick)")
    p.add_argument("--variant", type=csv_list(str), help="comma list of variants (default: all)")
    p.add_argument("--suite", type=csv_list(str), help=f"comma list of {', '.join(suite_names())}")
    p.add_argument("--mode", type=csv_list(str), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--seq-lens", type=csv_list(int), help="comma list of sequence lengths")
    p.add_argument("--batch", type=number(int))
    p.add_argument("--heads", type=number(int))
    p.add_argument("--head-dim", type=number(int))
    p.add_argument("--dtype", choices=tuple(DTYPES))
    causal = p.add_mutually_exclusive_group()
    causal.add_argument("--causal", action="store_const", const=(True,), dest="causal",
                        help="causal only (default: both)")
    causal.add_argument("--non-causal", action="store_const", const=(False,), dest="causal",
                        help="non-causal only")
    p.add_argument("--param", action="append", metavar="VARIANT.PARAM=VALUE[,VALUE]",
                   help="set (or sweep, with a comma list) a variant parameter")
    p.add_argument("--plugin", action="append", metavar="FILE.py",
                   help="a Python file whose @register_variant variants join the run")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path,
                       help="a new run directory (default results/runs/<run_id>)")
    where.add_argument("--resume", type=Path, metavar="RUN_DIR",
                       help="finish an interrupted run, with its stored configuration")
    p.add_argument("--rep-ms", type=number(float), help="measuring budget per timed case (ms)")
    p.add_argument("--min-samples", type=number(int),
                   help="fewest timed samples per case, however slow a call (default 10)")
    p.add_argument("--cuda-graph", action="store_const", const=True,
                   help="time each case as a CUDA-graph replay (GPU time without the Python "
                        "launch path, which dominates short calls)")
    p.add_argument("--accuracy-rows", type=number(int), help="query rows sampled for references")
    p.add_argument("--seed", type=number(int))
    p.add_argument("--in-process", action="store_true",
                   help="run cases in this process (faster start, no crash or hang isolation)")
    p.add_argument("--case-timeout", type=number(float), metavar="SECONDS",
                   help=f"limit per case in the worker process, 0 for none (default "
                        f"{RunOptions.case_timeout:g})")
    p.add_argument("--fail-fast", action="store_true",
                   help="stop at the first row whose status is not ok, exit 1")
    p.add_argument("--task", type=csv_list(str), metavar="TASK[,TASK]",
                   help="trained tasks of --suite task: mqar, listops, charlm (default: all)")
    p.add_argument("--seeds", type=number(int),
                   help="training seeds per task case (--suite task; default 1, preset tasks 3)")
    p.add_argument("--inputs", type=csv_list(str), metavar="SOURCE[,SOURCE]",
                   help="where q, k, v come from: randn (default), minilm (a real model's "
                        "attention, N <= 512), file:PATH (from `run_bench.py capture`)")
    p.add_argument("--shard", type=parse_shard, metavar="I/N",
                   help="run share I (0..N-1) of the sweep into --out, with N-1 other processes "
                        "(under torchrun the share comes from RANK and WORLD_SIZE)")
    return p


# Flags that define a run's configuration: `--resume` refuses any that would change it.
CONFIG_FLAGS = {
    "preset": "preset", "variant": "variants", "suite": "suites", "mode": "modes",
    "seq_lens": "seq_lens", "batch": "batch", "heads": "heads", "head_dim": "head_dim",
    "dtype": "dtype", "causal": "causal", "param": "params", "plugin": "plugins",
    "device": "device", "rep_ms": "rep_ms", "min_samples": "min_samples",
    "accuracy_rows": "accuracy_rows", "seed": "seed", "cuda_graph": "cuda_graph",
    "inputs": "inputs", "task": "tasks", "seeds": "seeds",
}  # fmt: skip


def print_listing(console: Console, device: str) -> None:
    import torch

    absent = ("CUDA is not available on this machine"
              if device == "cuda" and not torch.cuda.is_available() else None)
    table = Table(title=f"variants (availability on {device})", title_justify="left")
    for col in ("name", "family", "causal", "params (defaults)", "on " + device):
        table.add_column(col)
    table.columns[0].no_wrap = True  # a name is never cut, whatever the terminal's width
    table.columns[0].min_width = max((len(spec.name) for spec in all_variants()), default=4)
    for spec in all_variants():
        forms = "/".join("causal" if c else "non-causal" for c in spec.causal)
        params = ", ".join(f"{k}={v}" for k, v in spec.params.items()) or "-"
        reason = spec.unavailable_reason(torch.device(device)) or absent
        table.add_row(spec.name, spec.family, forms, escape(params), "yes" if reason is None else escape(reason))
    console.print(table)
    console.print("suites: " + ", ".join(f"{s.name}{'' if s.default else ' (on request)'}"
                                         for s in all_suites()))
    console.print(f"modes: {', '.join(MODES)}")
    console.print(f"presets: {', '.join(PRESETS)}")
    console.print("tasks (--suite task): mqar, listops, charlm")
    console.print(f"dtypes: {', '.join(DTYPES)}")
    console.print(f"inputs: {', '.join(INPUT_CHOICES)}")


def requested(args) -> dict:
    """The config fields the command line set explicitly (plugin and `file:` input paths made
    absolute)."""
    out = {}
    for arg, field_name in CONFIG_FLAGS.items():
        value = getattr(args, arg)
        if value is None:
            continue
        if arg in ("param", "plugin", "inputs"):
            absolute = {"plugin": plugin_path, "inputs": absolute_spec}.get(arg, str)
            value = tuple(absolute(v) for v in value)
        out[field_name] = value
    return out


def resumed_config(run_dir: Path, args) -> BenchConfig:
    """The stored configuration of `run_dir` (its plugins loaded); flags that would change it
    are refused."""
    if not run_dir.is_dir():
        raise ConfigError(f"cannot resume {run_dir}: not a run directory")
    meta = read_meta(run_dir)
    if "config" not in meta:
        raise ConfigError(f"cannot resume {run_dir}: no {META_FILE} with a config")
    try:
        config = BenchConfig.from_dict(meta["config"])
        load_plugins(config.plugins)  # their variants and suites are the run's
        validate(config)  # e.g. a CUDA run cannot be resumed on a CPU-only machine
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"cannot resume {run_dir}: {exc}") from None
    input_change = changed_input_file(meta.get("input_files") or {})
    if input_change:
        raise ConfigError(f"cannot resume {run_dir}: {input_change}")
    asked = requested(args)
    changed = [f"{flag(arg)} ({_show(getattr(config, name))} in the run)"
               for arg, name in CONFIG_FLAGS.items()
               if name in asked and asked[name] != getattr(config, name)]
    if changed:
        raise ConfigError(f"--resume keeps the run's configuration; these flags would change "
                          f"it: {', '.join(changed)}; start a new run with --out instead")
    return config


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def check_new_run_dir(out: Path, joining: bool = False) -> None:
    """A new run needs a directory that holds no run: refuse a file or an existing run (which
    the processes of a sharded run may join: `harness.shardrun` checks it is theirs)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; expected a directory for the run")
    check_writable(out)
    if joining:
        return
    if (out / META_FILE).exists() or (out / RESULTS_FILE).exists():
        raise ConfigError(f"--out {out} already holds a run; finish it with --resume {out}, "
                          f"or choose a new --out directory")


def check_writable(out: Path) -> None:
    """`out` is a directory this process can write, or can be made one: its nearest existing
    folder is a directory that it may write in."""
    there = out.absolute()
    while not there.exists():
        there = there.parent
    if not there.is_dir():
        raise ConfigError(f"cannot create --out {out}: {there} is a file, not a directory")
    if not os.access(there, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create --out {out}: {there} is not writable")


def config_from_args(args, sharded: bool = False) -> tuple[BenchConfig, Path]:
    """The run's configuration and directory, from a preset, overrides, or a resumed run
    (a sharded run's processes may find the directory their peers created)."""
    if args.resume:
        return resumed_config(args.resume, args), args.resume
    device = args.device or default_device()
    overrides = {k: v for k, v in requested(args).items() if k not in ("preset", "device")}
    if "seq_lens" not in overrides and args.inputs and "randn" not in args.inputs:
        overrides["seq_lens"] = default_lengths(args.inputs)  # a capture's lengths
    preset = args.preset or ("tasks" if args.suite == ("task",) and device == "cuda" else
                             "tasks-smoke" if args.suite == ("task",) else "quick")
    config = with_overrides(preset_config(preset, device), **overrides)
    if args.out:
        check_new_run_dir(args.out, joining=sharded)
    return config, args.out or new_run_dir(DEFAULT_ROOT, config)


def run_options(args) -> RunOptions:
    """Execution options from the command line (never part of the stored configuration)."""
    if args.in_process and args.case_timeout is not None:
        raise ConfigError("--case-timeout needs the worker process; drop it or --in-process")
    options = RunOptions(isolate=not args.in_process, fail_fast=args.fail_fast,
                         case_timeout=(0.0 if args.in_process else
                                       RunOptions.case_timeout if args.case_timeout is None
                                       else args.case_timeout))
    validate_options(options)
    return options


def interrupted_line(run_dir: Path, rows_dir: Path | None = None) -> str:
    """What Ctrl-C prints: cases on disk and the command that continues the run."""
    rows_dir = rows_dir or run_dir
    try:
        cases = len(finished_case_keys(load_existing(rows_dir)))
    except ResultsError:
        cases = 0
    return (f"interrupted: {cases} cases written to {rows_dir / RESULTS_FILE}; continue with: "
            f"python run_bench.py --resume {shlex.quote(str(run_dir))}")


def shard_line(sweep: ShardedSweep) -> str:
    """What a process of a sharded run prints when it ends without completing the run."""
    done = f"shard {sweep.shard}: {sweep.written} cases written"
    results = sweep.run_dir / RESULTS_FILE
    if sweep.merged.complete:
        return f"{done}; {results} is complete"
    return (f"{done}; the rows so far are merged into {results}, which the last process to end "
            f"completes (if one died: python run_bench.py --resume "
            f"{shlex.quote(str(sweep.run_dir))})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        if argv and argv[0] == "tasks":
            from harness.reports.tasks import main as tasks_main

            load_studies()  # their sections of the task report
            return tasks_main(argv[1:])
        if argv and argv[0] in REAL_COMMANDS:
            from harness.realcli import main as real_main

            load_studies()  # their sections of the quality report
            return real_main(argv)
        if argv and not argv[0].startswith("-"):  # plot, compare, report, a study's command
            from harness.reports.cli import main as reports_main

            load_studies()
            return reports_main(argv, OTHER_COMMANDS)
        load_builtin_suites()
        args = build_parser().parse_args(argv)
        shard = current_shard(args.shard)
        if shard is not None:
            pin_gpu(shard)  # before anything initialises CUDA
            stop_on_sigterm()
            require_run_dir(shard, args.out, args.resume)
        load_builtin_variants()
        load_plugins(args.plugin or ())
        if args.list:
            print_listing(console, args.device or default_device())
            return 0
        options = run_options(args)
        config, run_dir = config_from_args(args, sharded=shard is not None)
        sweep = make_sweep(config, run_dir, options, shard, resume=args.resume is not None)
    except (RegistryError, ConfigError, ResultsError, SuiteError, UsageError) as exc:
        return usage_error(exc)
    except KeyboardInterrupt:
        print("interrupted before the sweep started", file=sys.stderr)
        return 130
    try:
        warning = size_warning(sweep)
        if warning:
            print(warning, file=sys.stderr)
        sweep.run(["run_bench.py", *argv])
    except (RegistryError, ConfigError, ResultsError) as exc:
        return usage_error(exc)
    except KeyboardInterrupt:
        print(interrupted_line(run_dir, sweep.rows_dir), file=sys.stderr)
        return 130
    if isinstance(sweep, ShardedSweep) and not (sweep.merged.complete and sweep.merged.folded):
        print(shard_line(sweep), file=sys.stderr)
        return 1 if sweep.stopped_at is not None else 0
    for table in summary_tables(load_results(run_dir)):
        console.print(table)
    console.print(f"results: {run_dir / RESULTS_FILE}")
    if sweep.stopped_at is not None:
        row = sweep.stopped_at
        print(f"stopped at the first non-ok row (--fail-fast): {row.case.variant} "
              f"{row.case.suite} {row.case.mode} N={row.case.seq_len} causal={row.case.causal}: "
              f"{row.status}: {row.reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
