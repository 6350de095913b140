"""Entry point for `run_bench.py plot | compare | report`: argparse here, work in the modules."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import pandas as pd
from rich.console import Console

from harness.reports.analysis import CLAIM_RULE, claim_check, crossovers, slopes
from harness.reports.benchjson import load_compared
from harness.reports.committed import uncommitted_reason
from harness.reports.compare import compare_runs, parse_threshold, print_comparison
from harness.reports.data import BEST, CONFIG, Run, load_run, ok_values
from harness.reports.plots import write_plots
from harness.reports.readme import TARGETS_FILE, marker_span, rewrite, results_section, run_section
from harness.reports.tables import console, drop_constant, markdown_table, rich_table
from harness.reports.targets import N_TARGET, accuracy_side_by_side, evaluate_targets


class UsageError(ValueError):
    """Bad command-line input (argparse's complaint, as one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit(2)
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the three report subcommands."""
    parser = _Parser(prog="run_bench.py", description="Reports on attnbench results.")
    sub = parser.add_subparsers(dest="command", required=True)

    plot = sub.add_parser("plot", help="write a run's figures into RUN_DIR/plots")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR")
    report = sub.add_parser("report", help="claim check, slopes, crossovers, plots, README")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--readme", type=Path, help="rewrite this file's results section")
    report.add_argument("--targets-with", nargs="*", metavar="RUN_DIR",
                        help="also evaluate the kernel targets on these runs' rows pooled with "
                             "the first run's, into its targets.md")
    report.add_argument("--target-lengths", type=int, nargs="+", default=[N_TARGET], metavar="N")
    report.add_argument("--fit-from", type=int, default=0, metavar="N",
                        help="fit slopes on lengths >= N only (default: all)")
    for p in (plot, report):
        p.add_argument("--baseline", default=BEST,
                       help="speed-up baseline: a variant label, or 'best' (fastest exact softmax)")
        p.add_argument("--length", type=int, help="N of the accuracy-vs-speed plot "
                                                  "(default: largest N measured in both)")
        p.set_defaults(func=_plot if p is plot else _report)

    targets = sub.add_parser("targets", help="evaluate the kernel targets; write targets.md")
    targets.add_argument("runs", nargs="+", metavar="RUN_DIR",
                         help="runs whose rows are pooled; targets.md goes into the first")
    targets.add_argument("--length", type=int, nargs="+", default=[N_TARGET],
                         help="N the targets are read at (several: one table each)")
    targets.set_defaults(func=_targets)

    cmp = sub.add_parser("compare", help="compare two runs; exit 1 on a regression")
    cmp.add_argument("old", metavar="OLD", help="results CSV, run directory or pytest-benchmark "
                                                "JSON (benchmarks/test_speed.py)")
    cmp.add_argument("new", metavar="NEW", help="results CSV, run directory or pytest-benchmark "
                                                "JSON")
    cmp.add_argument("--threshold", type=_threshold, default=0.05,
                     help="regression threshold, e.g. 5%% or 0.05 (default 5%%)")
    cmp.add_argument("--metric", default="time_ms", help="metric to compare (default time_ms)")
    cmp.add_argument("--markdown", action="store_true", help="print markdown for PR text")
    cmp.set_defaults(func=_compare)
    return parser


def _threshold(text: str) -> float:
    try:
        return parse_threshold(text)
    except ValueError as exc:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str]) -> int:
    """Run one subcommand; returns the exit code (2 with a one-line error on bad input)."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except (ValueError, OSError) as exc:  # ResultsError, ReadmeError, UsageError are ValueErrors
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


def _check_plot_args(runs: list[Run], args: argparse.Namespace) -> None:
    """Reject a --baseline or --length that a run does not have (rather than a missing plot)."""
    for run in runs:
        if args.baseline != BEST and not (run.df["variant"] == args.baseline).any():
            raise UsageError(f"--baseline {args.baseline} is not a variant of run {run.name}")
        accuracy = ok_values(run.df, "accuracy", "rel_err_vs_softmax")
        if args.length and not (accuracy["seq_len"] == args.length).any():
            raise UsageError(f"run {run.name} has no rel_err_vs_softmax at --length {args.length}")


def _plot(args: argparse.Namespace) -> int:
    runs = [load_run(p) for p in args.runs]  # all load and check before any writes
    _check_plot_args(runs, args)
    for run in runs:
        paths = write_plots(run, args.baseline, args.length)
        print(f"{run.name}: wrote {len(paths)} files to {run.dir / 'plots'}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    comp = compare_runs(load_compared(args.old), load_compared(args.new), args.metric,
                        args.threshold)
    print_comparison(comp, markdown=args.markdown)
    return 1 if comp.regressions else 0


def write_targets(runs: list[Run], lengths: list[int], show: bool = True) -> Path:
    """Evaluate the kernel targets on the pooled rows of `runs`, one table per length, and
    write them with FMA vs FMMformer accuracy to targets.md in the first run's directory."""
    rows = pd.concat([r.df for r in runs], ignore_index=True)
    names = ", ".join(r.name for r in runs)
    sections = []
    for n in lengths:
        table = evaluate_targets(rows, runs[0].meta, n)
        accuracy = accuracy_side_by_side(rows, n)
        if show:
            console().print(rich_table(table, title=f"Kernel targets at N={n}"))
            console().print(rich_table(accuracy, title=f"FMA vs FMMformer accuracy at N={n}"))
        sections.append(f"### Kernel targets at N={n} (runs: {names})\n\n{markdown_table(table)}"
                        f"\n\n### FMA vs FMMformer accuracy at N={n}\n\n"
                        f"{markdown_table(accuracy)}\n")
    path = runs[0].dir / TARGETS_FILE
    path.write_text("\n".join(sections))
    return path


def _targets(args: argparse.Namespace) -> int:
    path = write_targets([load_run(p) for p in args.runs], args.length)
    print(f"wrote {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    runs = [load_run(p) for p in args.runs]
    _check_plot_args(runs, args)
    if args.readme:
        marker_span(args.readme)  # fail before the slow part, not after it
        for path in [*args.runs, *(args.targets_with or [])]:
            reason = uncommitted_reason(Path(path), args.readme)
            if reason:
                raise UsageError(f"not writing {args.readme}: {reason}; a README shows only "
                                 "committed results")
    out = console()
    if args.targets_with is not None:  # the targets table is regenerated with the README
        extra = [load_run(p) for p in args.targets_with]
        path = write_targets([runs[0], *extra], args.target_lengths, show=False)
        out.print(f"wrote {path}", highlight=False)
    sections = []
    for run in runs:
        claims = claim_check(run.df)
        print_analysis(out, run, claims, args.fit_from)
        paths = write_plots(run, args.baseline, args.length)
        out.print(f"wrote {len(paths)} files to {run.dir / 'plots'}", highlight=False)
        if args.readme:
            scaling = [p for p in paths if p.name.startswith("scaling-") and p.suffix == ".png"]
            sections.append(run_section(run, claims, scaling, args.readme.resolve().parent))
    if args.readme:
        command = shlex.join(["python", "run_bench.py", *sys.argv[1:]] if sys.argv[1:2] == ["report"]
                             else ["python", "run_bench.py", "report", *args.runs,
                                   "--readme", str(args.readme)])
        rewrite(args.readme, results_section(sections, command))
        out.print(f"rewrote the results section of {args.readme}", highlight=False)
    return 0


def print_analysis(out: Console, run: Run, claims: pd.DataFrame, fit_from: int = 0) -> None:
    """Print a run's claim check, log-log slopes and crossover lengths as rich tables."""
    head = run.meta.get("gpu") or ", ".join(sorted(run.df["device"].unique()))
    out.rule(f"{run.name} ({head})")
    out.print(rich_table(drop_constant(claims, CONFIG), title="Claim check", caption=CLAIM_RULE))
    fits = slopes(run.df, fit_from)
    fits = fits.assign(slope=fits["slope"].map("{:.2f}".format),
                       fit=fits["from_len"].astype(str) + ".." + fits["to_len"].astype(str))
    fits = drop_constant(fits.drop(columns=["from_len", "to_len"]), CONFIG)
    out.print(rich_table(fits, title="Log-log slope vs N (value ~ N^slope over the fit range)"))
    cross = drop_constant(crossovers(run.df), CONFIG)
    out.print(rich_table(cross, title="Crossover: N from which the variant stays faster"))
