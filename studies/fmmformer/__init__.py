"""The FMMformer study: the paper's Figure 6 claims (`claims`), the performance targets of
the FMMformer and FMA Triton kernels (`targets`), evaluated on measured runs, the paper's
low-rank claim on captured attention maps (`lowrank`, `lowrank_plots`, `lowrank_report`), and
the FMMformer, FMA and Zoology quality claims restated as orderings on the trained tasks
(`task_claims`).

It adds to the report command: the claim check of each run (in `fmmformer.md` beside the run
and linked from its README part), `report --targets-with RUN... --target-lengths N...`, and
the `targets` command, which writes `targets.md` into the first run's directory; the `lowrank`
command; the low-rank verdict to the quality report of a run with lowrank.csv; and the trained
tasks' claim check to the `tasks` report.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from harness.reports.data import Run, load_run
from harness.reports.study import Section, register_study
from harness.reports.tables import console, markdown_table, rich_table
from studies.fmmformer import lowrank_report, task_claims
from studies.fmmformer.claims import CLAIM_RULE, claim_check
from studies.fmmformer.targets import (
    N_TARGET,
    TargetsError,
    accuracy_side_by_side,
    evaluate_targets,
)

TARGETS_FILE = "targets.md"


def roofline_run(runs: list[Run]) -> Run:
    """The run whose roofline the targets use: the first that measured one (else the first).
    `TargetsError` when the runs name different GPUs: their rows and rooflines do not pool."""
    gpus = sorted({str(r.meta["gpu"]) for r in runs if r.meta.get("gpu")})
    if len(gpus) > 1:
        raise TargetsError(f"runs {', '.join(r.name for r in runs)} were measured on different "
                           f"GPUs ({', '.join(gpus)}); targets pool runs of one GPU")
    return next((r for r in runs if r.meta.get("roofline")), runs[0])


def write_targets(runs: list[Run], lengths: list[int], show: bool = True) -> Path:
    """Evaluate the kernel targets on the pooled rows of `runs` (one configuration and one GPU,
    else `TargetsError`; a case measured in several runs takes the last one's row), one table
    per length, and write them with FMA vs FMMformer accuracy to targets.md in the first run's
    directory."""
    rows = pd.concat([r.df for r in runs], ignore_index=True)
    names = ", ".join(r.name for r in runs)
    roofline = roofline_run(runs)
    tables = [(n, evaluate_targets(rows, roofline.meta, n), accuracy_side_by_side(rows, n))
              for n in lengths]  # every length checked before anything is shown or written
    parts = []
    for n, table, accuracy in tables:
        if show:
            console().print(rich_table(table, title=f"Kernel targets at N={n}"))
            console().print(rich_table(accuracy, title=f"FMA vs FMMformer accuracy at N={n}"))
        parts.append(f"### Kernel targets at N={n} (runs: {names}; roofline of {roofline.name}; "
                     "column runs: where each target's values come from)\n\n"
                     f"{markdown_table(table)}"
                     f"\n\n### FMA vs FMMformer accuracy at N={n}\n\n"
                     f"{markdown_table(accuracy)}\n")
    path = runs[0].dir / TARGETS_FILE
    path.write_text("\n".join(parts))
    return path


def report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--targets-with", nargs="*", metavar="RUN_DIR",
                        help="also evaluate the FMMformer study's kernel targets on these runs' "
                             "rows pooled with the first run's, into its targets.md")
    parser.add_argument("--target-lengths", type=int, nargs="+", default=[N_TARGET],
                        metavar="N")


def before_report(runs: list[Run], args: argparse.Namespace) -> None:
    """`--targets-with`: regenerate the first run's targets.md before its sections are read."""
    if args.targets_with is not None:
        extra = [load_run(p) for p in args.targets_with]
        path = write_targets([runs[0], *extra], args.target_lengths, show=False)
        console().print(f"wrote {path}", highlight=False)


def commands(sub: argparse._SubParsersAction) -> None:
    targets = sub.add_parser("targets", help="evaluate the FMMformer study's kernel targets; "
                                             "write targets.md")
    targets.add_argument("runs", nargs="+", metavar="RUN_DIR",
                         help="runs whose rows are pooled; targets.md goes into the first")
    targets.add_argument("--length", type=int, nargs="+", default=[N_TARGET],
                         help="N the targets are read at (several: one table each)")
    targets.set_defaults(func=_targets)
    lowrank_report.add_command(sub)


def _targets(args: argparse.Namespace) -> int:
    path = write_targets([load_run(p) for p in args.runs], args.length)
    print(f"wrote {path}")
    return 0


@register_study("fmmformer", report_options=report_options, before_report=before_report,
                commands=commands, quality_sections=lowrank_report.quality_sections,
                task_sections=task_claims.task_sections)
def sections(run: Run) -> list[Section]:
    """The claim check of `run`, and its kernel targets when `targets.md` is beside it."""
    out = [Section("Claim check (FMMformer paper, Figure 6: rank 3 + band 30 vs softmax)",
                   claim_check(run.df), caption=CLAIM_RULE)]
    targets = run.dir / TARGETS_FILE
    if targets.is_file():
        out.append(Section("Kernel targets", markdown=targets.read_text()))
    return out
