"""The papers' quality claims restated as orderings on the trained tasks: FMMformer's language
modelling and Long Range Arena results, FMA's enwik8 result, and Zoology's finding on MQAR,
each checked at every setting of its task in a run of the task suite (`task_sections`, shown by
`run_bench.py tasks RUN_DIR`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from harness.reports.data import Run, params_of
from harness.reports.study import Section
from harness.reports.tasks import scores, seed_counts, task_rows
from harness.suite import higher_is_better

NOT_REPRODUCIBLE = (
    "The papers' absolute numbers (Long Range Arena accuracies, WikiText-103 perplexity, enwik8 "
    "bits per character) are not reproducible here: these are small models trained for a few "
    "million tokens on generated data and the Python standard library, so only the direction "
    "of each claim is tested."
)
# The family whose learning a task at a setting makes its orderings mean something.
BASELINE = "softmax"
# The level at which the baseline has learned a task (metric, bound in the metric's direction):
# MQAR: twice the 1/4 that picking one of the context's values scores with 4 pairs, more than
# that with more pairs; ListOps: above the held-out sets' most frequent class (0.20 to 0.22);
# character LM: half a bit under the held-out text's byte frequencies (4.47 bits, Python 3.11).
SOLVED = {"mqar": ("accuracy", 0.5), "listops": ("accuracy", 0.3), "charlm": ("bpc", 4.0)}
CAPTION = (f"(means over seeds; a family's best variant stands for it; `n/a` when a seed failed, "
           f"when {BASELINE} did not learn the task at that setting (MQAR accuracy >= "
           f"{SOLVED['mqar'][1]}, ListOps >= {SOLVED['listops'][1]}, bpc <= "
           f"{SOLVED['charlm'][1]}), or when FMMformer did not run in the claim's configuration). "
           + NOT_REPRODUCIBLE)
FMM_SHORT = {"bandwidth": "k", "kernels": "r"}
# The paper's LRA configuration (2 kernels + band 5; SPEC: k = 5, r in {1, 2}).
LRA_FMM = {"bandwidth": (5,), "kernels": (1, 2)}


@dataclass(frozen=True)
class Ordering:
    """A claim as an ordering of families on one task's metric, best first; a tuple in `order`
    groups families of one rank: each must be at least as good as every family of the next.
    `configs` restricts a family to the variants whose params take the values listed."""

    text: str
    source: str
    metric: str
    task: str
    order: tuple[str | tuple[str, ...], ...]
    configs: dict[str, dict[str, tuple]] = field(default_factory=dict)


CLAIMS = (
    Ordering("bpc softmax <= fmmformer <= linear",
             "FMMformer: WikiText-103 perplexity 34.29 <= 36.11 <= 38.40", "bpc", "charlm",
             ("softmax", "fmm", "linear")),
    Ordering("accuracy fmmformer >= linear", "FMMformer: LRA average above linear attention's",
             "accuracy", "listops", ("fmm", "linear"), {"fmm": LRA_FMM}),
    Ordering("accuracy fmmformer >= softmax", "FMMformer: LRA average 60.74 vs softmax 58.70",
             "accuracy", "listops", ("fmm", "softmax"), {"fmm": LRA_FMM}),
    Ordering("bpc fma <= fmmformer, linear, window",
             "FMA: beats other efficient methods on enwik8", "bpc", "charlm",
             ("multipole", ("fmm", "linear", "window"))),
    Ordering("accuracy softmax >= linear",
             "Zoology: attention solves MQAR, linear attention does not", "accuracy", "mqar",
             ("softmax", "linear")),
)


def config_text(params: dict) -> str:
    """FMMformer's bandwidth and kernel count as `k=5, r=2` (empty for other params)."""
    return ", ".join(f"{short}={params[name]}" for name, short in FMM_SHORT.items()
                     if name in params)


def with_params(table: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """`table` (with setting and variant columns) with each variant's params (a dict)."""
    raw = (rows.drop_duplicates(["setting", "variant"]).set_index(["setting", "variant"])["params"]
           if "params" in rows else pd.Series(dtype=object))
    return table.assign(params=[params_of(raw.get((st, v), "")) for st, v in
                                zip(table["setting"], table["variant"])])


def of_family(table: pd.DataFrame, setting: str, family: str,
              config: dict[str, tuple] | None = None) -> pd.DataFrame:
    """The rows of `table` of the family's variants in `setting` whose params match `config`."""
    rows = table[(table["setting"] == setting) & (table["family"] == family)]
    if config:
        rows = rows[[all(p.get(k) in v for k, v in config.items()) for p in rows["params"]]]
    return rows


def family_score(s: pd.DataFrame, setting: str, family: str, higher: bool,
                 config: dict[str, tuple] | None = None):
    """The row of the family's best variant in `setting` of the scores `s` (restricted to the
    variants whose params match `config`), or None."""
    rows = of_family(s, setting, family, config)
    if rows.empty:
        return None
    return rows.loc[rows["mean"].idxmax() if higher else rows["mean"].idxmin()]


def entry_text(r) -> str:
    """`variant (k=.., r=..) mean ± std (ok/run seeds)`."""
    config = config_text(r["params"]) if r["family"] == "fmm" else ""
    spread = f" ± {r['std']:.3f}" if r["std"] == r["std"] else ""
    return (f"{r['variant']}{f' ({config})' if config else ''} {r['mean']:.3f}{spread} "
            f"({r['count']}/{r['seeds']} seeds)")


def unusable(s: pd.DataFrame, counts: pd.DataFrame, setting: str, claim: Ordering,
             found) -> str | None:
    """Why the ordering cannot be read at `setting` (None when it can): a seed of a variant of
    its families that failed, a family missing or not run in the claim's configuration, a
    baseline that did not learn. `s`: the scores, `counts`: the seed counts, with params."""
    families = [f for g in claim.order for f in (g if isinstance(g, tuple) else (g,))]
    ran = pd.concat([of_family(counts, setting, f, claim.configs.get(f)) for f in families])
    short = [f"{r.variant} {r.ok}/{r.seeds}" for r in ran.itertuples() if r.ok < r.seeds]
    if short:
        return f"seeds failed ({', '.join(short)} ok)"
    for family, best in zip(families, found):
        if best is not None:
            continue
        ran = s[(s["setting"] == setting) & (s["family"] == family)]
        if ran.empty:
            return f"no {family} variant measured"
        configs = "; ".join(sorted({config_text(p) for p in ran["params"]}))
        wanted = ", ".join(f"{FMM_SHORT.get(k, k)} in {{{', '.join(map(str, v))}}}"
                           for k, v in claim.configs[family].items())
        return f"{family} ran as {configs}, not the claim's configuration ({wanted})"
    metric, bound = SOLVED[claim.task]
    base = family_score(s, setting, BASELINE, higher_is_better(metric))
    if base is None:
        return f"no {BASELINE} baseline measured"
    if not _better_or_equal(base["mean"], bound, higher_is_better(metric)):
        sign = ">=" if higher_is_better(metric) else "<="
        return (f"{BASELINE} did not learn {setting} ({base['variant']} {metric} "
                f"{base['mean']:.3f}; learned: {sign} {bound})")
    return None


def claim_check(rows: pd.DataFrame) -> pd.DataFrame:
    """Each claim at each setting of its task in the task rows `rows`: the measured values and
    holds / does not hold on the means over seeds (a family's best variant stands for it), or
    n/a with the reason (see `unusable`)."""
    s = with_params(scores(rows), rows)
    counts = with_params(seed_counts(rows), rows)
    out = []
    for claim in CLAIMS:
        higher = higher_is_better(claim.metric)
        entry = {"claim": claim.text, "source": claim.source}
        settings = sorted(s[s["task"] == claim.task]["setting"].unique())
        if not settings:
            out.append({**entry, "setting": claim.task,
                        "measured": "not measured (task not in this run)", "verdict": "n/a"})
        for setting in settings:
            groups = [g if isinstance(g, tuple) else (g,) for g in claim.order]
            found = [family_score(s, setting, f, higher, claim.configs.get(f))
                     for g in groups for f in g]
            measured = "; ".join(entry_text(r) for r in found if r is not None)
            why = unusable(s, counts, setting, claim, found)
            if why is not None:
                out.append({**entry, "setting": setting, "measured": measured or "-",
                            "verdict": f"n/a ({why})"})
                continue
            ranked, i = [], 0
            for g in groups:
                ranked.append(found[i:i + len(g)])
                i += len(g)
            holds = all(_better_or_equal(a["mean"], b["mean"], higher)
                        for first, second in zip(ranked, ranked[1:])
                        for a in first for b in second)
            out.append({**entry, "setting": setting, "measured": measured,
                        "verdict": "holds" if holds else "does not hold"})
    return pd.DataFrame(out, columns=["claim", "setting", "source", "measured", "verdict"])


def _better_or_equal(a: float, b: float, higher: bool) -> bool:
    return a >= b if higher else a <= b


def task_sections(run: Run) -> list[Section]:
    """The claim check of a task-suite run; none when the run has no task rows."""
    rows = task_rows(run.df)
    if rows.empty:
        return []
    return [Section("Claim check", claim_check(rows), caption=CAPTION)]
