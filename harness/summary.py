"""The rich summary table printed at the end of a run."""
from __future__ import annotations

import pandas as pd
from rich.markup import escape
from rich.table import Table

from harness.suite import all_suites

MEASURED = ("ok", "inexact")  # statuses whose rows hold a value


def _cell(group: pd.DataFrame, metric: str, fmt: str) -> str:
    """The metric's value (the mean over a seeded suite's seeds, saying how many; "INEXACT"
    added when one is flagged), else the failure's status."""
    measured = group[group.status.isin(MEASURED) & (group.metric == metric)]
    if not measured.empty:
        seeds = f" (mean of {len(measured)})" if len(measured) > 1 else ""
        flag = " INEXACT" if (measured.status == "inexact").any() else ""
        return fmt.format(measured.value.mean()) + seeds + flag
    failed = group[~group.status.isin(MEASURED)]
    return failed.status.iloc[0].upper() if not failed.empty else ""


def skipped_variants(df: pd.DataFrame) -> dict[str, str]:
    """Variants skipped in every case (e.g. CUDA-only on a CPU run), with the first reason."""
    always = df.groupby("variant").status.agg(lambda s: (s == "skipped").all())
    skipped = df[df.variant.isin(always[always].index)]
    return skipped.groupby("variant").reason.first().to_dict()


def summary_tables(df: pd.DataFrame) -> list[Table]:
    """One table per summary column that the suites present declare (`Suite.summary`): rows
    variant x mode x causal, columns the (inputs, sequence length) pairs where the metric
    was measured or its case failed (named by length alone when the suite ran one inputs
    source); none for a metric no case of the run reported.

    Variants that never ran get one line each in a last table instead of rows of SKIPPED.
    """
    skipped = skipped_variants(df)
    df = df[~df.variant.isin(skipped)]
    tables = []
    columns = [(s.name, c.metric, c.title, c.fmt) for s in all_suites() for c in s.summary]
    for suite, metric, title, fmt in columns:
        part = df[df.suite == suite]
        named = part.inputs.nunique() > 1
        problems = sorted(set(part.loc[part.metric == metric, ["inputs", "seq_len"]]
                              .itertuples(index=False, name=None)))
        if not problems:
            continue
        table = Table(title=title, title_justify="left")
        for col in ("variant", "mode", "causal"):
            table.add_column(col)
        for inputs, n in problems:
            table.add_column(escape(f"{inputs} N={n}" if named else f"N={n}"), justify="right")
        wanted = pd.Series([p in problems for p in zip(part.inputs, part.seq_len)],
                           index=part.index, dtype=bool)
        part = part[part["mode"].isin(part.loc[part.metric == metric, "mode"].unique()) & wanted]
        for (variant, mode, causal), group in part.groupby(["variant", "mode", "causal"], sort=True):
            cells = [_cell(group[(group.inputs == i) & (group.seq_len == n)], metric, fmt)
                     for i, n in problems]
            table.add_row(escape(variant), mode, str(causal), *cells)  # w[k=3] is no markup
        tables.append(table)
    if skipped:
        table = Table(title="skipped variants", title_justify="left")
        table.add_column("variant")
        table.add_column("reason")
        for variant, reason in sorted(skipped.items()):
            table.add_row(escape(variant), escape(reason))
        tables.append(table)
    return tables
