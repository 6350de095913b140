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
    variant x inputs x mode x causal (an `inputs` column when the suite's rows come from more
    than one input source), columns sequence length.

    Variants that never ran get one line each in a last table instead of rows of SKIPPED.
    """
    skipped = skipped_variants(df)
    df = df[~df.variant.isin(skipped)]
    tables = []
    columns = [(s.name, c.metric, c.title, c.fmt) for s in all_suites() for c in s.summary]
    for suite, metric, title, fmt in columns:
        part = df[df.suite == suite]
        if part.empty:
            continue
        lengths = sorted(part.seq_len.unique())
        several = part.inputs.nunique() > 1
        table = Table(title=title, title_justify="left")
        for col in ("variant", *(["inputs"] if several else []), "mode", "causal"):
            table.add_column(col)
        for n in lengths:
            table.add_column(f"N={n}", justify="right")
        part = part[part["mode"].isin(part.loc[part.metric == metric, "mode"].unique())]
        groups = part.groupby(["variant", "inputs", "mode", "causal"], sort=True)
        for (variant, inputs, mode, causal), group in groups:
            cells = [_cell(group[group.seq_len == n], metric, fmt) for n in lengths]
            source = [escape(inputs)] if several else []
            table.add_row(escape(variant), *source, mode, str(causal), *cells)  # w[k=3] is no markup
        tables.append(table)
    if skipped:
        table = Table(title="skipped variants", title_justify="left")
        table.add_column("variant")
        table.add_column("reason")
        for variant, reason in sorted(skipped.items()):
            table.add_row(escape(variant), escape(reason))
        tables.append(table)
    return tables
