"""Entry point for `run_bench.py plot | compare | report` and the studies' own commands
(`harness.reports.study`): argparse here, the work in the modules."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rich.console import Console

from harness.reports.analysis import crossovers, slopes
from harness.reports.benchjson import load_compared
from harness.reports.committed import uncommitted_reason
from harness.reports.compare import compare_runs, parse_threshold, print_comparison
from harness.reports.data import BEST, CONFIG, Run, load_run, ok_values
from harness.reports.plots import write_plots
from harness.reports.readme import marker_span, results_section, rewrite, run_section
from harness.reports.study import all_studies, print_sections, write_sections
from harness.reports.tables import console, drop_constant, rich_table
from harness.usage import OneLineParser, UsageError, usage_error
from suites import load_builtin_suites


def build_parser(others: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The parser of the report subcommands, the registered studies' options and commands
    included; `others` ({name: help}) names the commands that run_bench.py hands elsewhere, so
    that an unknown command lists every one."""
    parser = OneLineParser(prog="run_bench.py", description="Reports on attnbench results.")
    sub = parser.add_subparsers(dest="command", required=True)

    plot = sub.add_parser("plot", help="write a run's figures into RUN_DIR/plots")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR")
    report = sub.add_parser("report", help="slopes, crossovers, plots, the studies' tables, "
                                           "README")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--readme", type=Path, help="rewrite this file's results section")
    report.add_argument("--fit-from", type=int, default=0, metavar="N",
                        help="fit slopes on lengths >= N only (default: all)")
    for p in (plot, report):
        p.add_argument("--baseline", default=BEST,
                       help="speed-up baseline: a variant label, or 'best' (fastest exact softmax)")
        p.add_argument("--length", type=int, help="N of the accuracy-vs-speed plot "
                                                  "(default: largest N measured in both)")
        p.set_defaults(func=_plot if p is plot else _report)

    cmp = sub.add_parser("compare", help="compare two runs; exit 1 on a regression")
    cmp.add_argument("old", metavar="OLD", help="results CSV, run directory or pytest-benchmark "
                                                "JSON (benchmarks/test_speed.py)")
    cmp.add_argument("new", metavar="NEW", help="results CSV, run directory or pytest-benchmark "
                                                "JSON")
    cmp.add_argument("--threshold", type=_threshold, default=0.05,
                     help="regression threshold, e.g. 5%% or 0.05 (default 5%%)")
    cmp.add_argument("--metric", default="time_ms", help="metric to compare (default time_ms)")
    cmp.add_argument("--markdown", action="store_true", help="print markdown for PR text")
    cmp.add_argument("--allow-missing", action="store_true",
                     help="cases of OLD that NEW lacks are listed but do not fail (default: "
                          "each is a regression)")
    cmp.set_defaults(func=_compare)
    for study in all_studies():
        if study.report_options:
            study.report_options(report)
        if study.commands:
            study.commands(sub)
    for name, text in (others or {}).items():
        sub.add_parser(name, help=text)
    return parser


def _threshold(text: str) -> float:
    try:
        return parse_threshold(text)
    except ValueError as exc:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str], others: dict[str, str] | None = None) -> int:
    """Run one subcommand; returns the exit code (2 with a one-line error on bad input).
    `others`: see `build_parser`."""
    load_builtin_suites()  # metric units, directions and the scaling suites
    try:
        args = build_parser(others).parse_args(argv)
        return args.func(args)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except (ValueError, OSError) as exc:  # ResultsError, ReadmeError, UsageError are ValueErrors
        return usage_error(exc)


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
                        args.threshold, allow_missing=args.allow_missing)
    print_comparison(comp, markdown=args.markdown)
    return 1 if comp.regressions else 0


def _report(args: argparse.Namespace) -> int:
    runs = [load_run(p) for p in args.runs]
    _check_plot_args(runs, args)
    if args.readme:
        marker_span(args.readme)  # fail before the slow part, not after it
        for path in [*args.runs, *(getattr(args, "targets_with", None) or [])]:
            reason = uncommitted_reason(Path(path), args.readme)
            if reason:
                raise UsageError(f"not writing {args.readme}: {reason}; a README shows only "
                                 "committed results")
    out = console()
    studies = all_studies()
    for study in studies:
        if study.before_report:
            study.before_report(runs, args)
    sections = []
    for run in runs:
        print_analysis(out, run, args.fit_from)
        files = []
        for study in studies:
            parts = study.sections(run)
            print_sections(out, parts)
            files.append(write_sections(study, run, parts))
        paths = write_plots(run, args.baseline, args.length)
        out.print(f"wrote {len(paths)} files to {run.dir / 'plots'} and "
                  f"{', '.join(p.name for p in files) or 'no study file'}", highlight=False)
        if args.readme:
            scaling = [p for p in paths if p.name.startswith("scaling-") and p.suffix == ".png"]
            sections.append(run_section(run, scaling, args.readme.resolve().parent, files))
    if args.readme:
        command = shlex.join(["python", "run_bench.py", *sys.argv[1:]] if sys.argv[1:2] == ["report"]
                             else ["python", "run_bench.py", "report", *args.runs,
                                   "--readme", str(args.readme)])
        rewrite(args.readme, results_section(sections, command))
        out.print(f"rewrote the results section of {args.readme}", highlight=False)
    return 0


def print_analysis(out: Console, run: Run, fit_from: int = 0) -> None:
    """Print a run's log-log slopes and crossover lengths as rich tables."""
    head = run.meta.get("gpu") or ", ".join(sorted(run.df["device"].unique()))
    out.rule(f"{run.name} ({head})")
    fits = slopes(run.df, fit_from)
    fits = fits.assign(slope=fits["slope"].map("{:.2f}".format),
                       fit=fits["from_len"].astype(str) + ".." + fits["to_len"].astype(str))
    fits = drop_constant(fits.drop(columns=["from_len", "to_len"]), CONFIG)
    out.print(rich_table(fits, title="Log-log slope vs N (value ~ N^slope over the fit range)"))
    cross = drop_constant(crossovers(run.df), CONFIG)
    out.print(rich_table(cross, title="Crossover: N from which the variant stays faster"))
