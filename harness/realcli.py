"""Entry point for `run_bench.py capture | dropin | quality`: argparse here, the work in
harness.capture, harness.dropin and harness.reports.quality (with the registered studies'
sections of the run, `harness.reports.study`)."""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from harness.reports.tables import console, rich_table
from harness.usage import OneLineParser, UsageError, usage_error


def print_table(df: pd.DataFrame, title: str) -> None:
    console().print(rich_table(df, title=title))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="run_bench.py", description="Quality on real attention.")
    sub = parser.add_subparsers(dest="command", required=True)

    cap = sub.add_parser("capture", help="capture q, k, v of every attention layer of a model")
    cap.add_argument("--model", type=Path, required=True,
                     help="local Hugging Face model dir (or a .gguf file)")
    cap.add_argument("--text", type=Path, required=True, help="a text file to run the model on")
    cap.add_argument("--seq-len", type=int, required=True, help="tokens N to capture")
    cap.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    cap.set_defaults(func=_capture)

    drop = sub.add_parser("dropin", help="MiniLM with each variant as its attention: embedding "
                                         "cosine to the exact model's, into RUN_DIR/dropin.csv")
    drop.add_argument("--out", type=Path, required=True, metavar="RUN_DIR")
    drop.add_argument("--variant", help="comma list (default: every registered variant)")
    drop.add_argument("--param", action="append", default=[], metavar="VARIANT.PARAM=VALUE[,V]")
    drop.add_argument("--texts", default="sentences,passages",
                      help="comma list of held-out text kinds: sentences, passages")
    drop.add_argument("--count", type=int, default=0,
                      help="texts per kind (default: 128 sentences, 40 passages)")
    drop.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    drop.set_defaults(func=_dropin)

    qual = sub.add_parser("quality", help="quality tables, quality-vs-speed plots, README part")
    qual.add_argument("run", type=Path, metavar="RUN_DIR")
    qual.add_argument("--speed-run", type=Path, help="a GPU run whose time_ms rows give y")
    qual.add_argument("--speed-length", type=int, default=16384, help="N of the speed rows")
    qual.add_argument("--length", type=int, help="N of the accuracy rows (default: largest)")
    qual.add_argument("--readme", type=Path, help="rewrite this file's quality section")
    qual.set_defaults(func=_quality)
    return parser


def main(argv: list[str]) -> int:
    """Run one subcommand; returns the exit code (2 with a one-line error on bad input)."""
    from harness.capture import CaptureError
    from harness.config import ConfigError
    from harness.registry import RegistryError
    from harness.results import ResultsError

    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except (CaptureError, ConfigError, RegistryError, ResultsError, UsageError, ValueError,
            OSError) as exc:
        return usage_error(exc)


def _capture(args: argparse.Namespace) -> int:
    from harness.capture import CaptureError, capture_qkv, load_model, save_qkv, token_ids

    if args.seq_len < 1:
        raise UsageError(f"--seq-len must be a positive integer, got {args.seq_len}")
    if not args.text.is_file():
        raise CaptureError(f"no text file at {args.text}")
    text = args.text.read_text(errors="replace")
    model, tokenizer = load_model(args.model)
    qkv = capture_qkv(model, token_ids(tokenizer, text, args.seq_len),
                      {"model": args.model.name, "text": args.text.name})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_qkv(qkv, args.out)
    layers, heads, n, d = qkv.dims
    print(f"wrote {args.out}: {layers} layers x {heads} heads, N={n}, head_dim={d}, "
          f"causal={qkv.causal}")
    return 0


def _variant_configs(names: str | None, params: list[str]):
    from harness.registry import all_variants, expand_configs, get_variant, parse_param_overrides
    from variants import load_builtin_variants

    load_builtin_variants()
    named = [n for n in (names or "").split(",") if n]
    chosen = named or [s.name for s in all_variants()]
    for name in chosen:
        get_variant(name)
    overrides = parse_param_overrides(params)
    outside = [name for name in overrides if name not in chosen]
    if outside:
        raise UsageError(f"--param names variant '{outside[0]}', which is not in --variant; "
                         f"variants: {', '.join(chosen)}")
    return expand_configs(chosen, overrides)


def _dropin(args: argparse.Namespace) -> int:
    import torch

    from harness import minilm
    from harness.dropin import dropin_table
    from harness.reports.quality import DROPIN_COUNTS, DROPIN_FILE, dropin_rows
    from harness.text import HELDOUT

    if args.count < 0:
        raise UsageError(f"--count must be a positive integer (0: the defaults), got "
                         f"{args.count}")
    kinds = [k for k in args.texts.split(",") if k]
    bad = [k for k in kinds if k not in HELDOUT]
    if bad or not kinds:
        raise UsageError(f"unknown --texts '{','.join(bad)}'; valid: {', '.join(HELDOUT)}")
    configs = _variant_configs(args.variant, args.param)
    old = dropin_rows(args.out)  # checked before the model runs
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, tokenizer = minilm.load()
    defaults = {"sentences": 128, "passages": 40}
    tables = []
    for kind in kinds:
        texts = HELDOUT[kind](args.count or defaults[kind])
        table = dropin_table(model, tokenizer, configs, texts, dtype)
        tables.append(table.assign(texts=kind))
        print_table(table, f"drop-in quality, {len(texts)} held-out {kind}")
    new = pd.concat(tables, ignore_index=True)
    path = args.out / DROPIN_FILE
    args.out.mkdir(parents=True, exist_ok=True)
    if old is not None:  # rows of other variants or text kinds stay
        keep = ~old.set_index(["variant", "texts"]).index.isin(
            new.set_index(["variant", "texts"]).index)
        new = pd.concat([old[keep], new], ignore_index=True)
    new = new.astype({col: "Int64" for col in DROPIN_COUNTS})  # whole numbers, blank if none
    new.to_csv(path, index=False)
    print(f"wrote {path}")
    return 0


def _quality(args: argparse.Namespace) -> int:
    from harness.reports.data import load_run
    from harness.reports.quality import (
        MARKERS,
        dropin_rows,
        dropin_table,
        exact_variants,
        failed_cases,
        quality_table,
        section,
        speed_points,
    )
    from harness.reports.readme import rewrite
    from harness.reports.realplots import quality_vs_speed
    from harness.reports.study import study_sections

    run = load_run(args.run)
    table = quality_table(run.df, args.length)
    if table.empty:
        raise UsageError(f"run {args.run} has no accuracy rows on captured inputs "
                         "(run it with --inputs minilm --suite accuracy)")
    dropin = dropin_rows(run.dir)  # side tables read (and checked) before anything prints
    studies = study_sections(run, "quality_sections")
    print_table(table, "rel_err_vs_softmax over (layer, head)")
    failed = failed_cases(run.df)
    if not failed.empty:
        print_table(failed, "cases that did not run")
    if dropin is not None:
        print_table(dropin_table(dropin, mark_exact=True), "drop-in quality")
    for part in studies:
        if part.table is not None:
            print_table(part.table, part.title)
    figures, notes = [], []
    if args.speed_run:
        speed = load_run(args.speed_run)
        n = args.speed_length
        plots = run.dir / "plots"
        where = speed.meta.get("gpu") or speed.name
        rel = table[table["causal"] == False]  # noqa: E712 - pandas column comparison
        points = speed_points(rel, speed.df, "median", n)
        if points.empty:
            raise UsageError(f"no variant has both non-causal accuracy rows in {args.run} and "
                             f"fwd time_ms rows at N={n} in {args.speed_run}")
        n_acc = int(table["N"].iloc[0])
        figures.append(quality_vs_speed(
            points, f"median rel_err_vs_softmax over {table['inputs'].iloc[0]} heads, "
                    f"N={n_acc}, non-causal",
            f"quality vs speed: time at N={n}, fwd, non-causal, "
            f"{', '.join(sorted(speed.df.loc[speed.df['seq_len'] == n, 'dtype'].unique()))} "
            f"({where})",
            plots / "quality-vs-speed")[0])
        if dropin is not None and (dropin["status"] == "ok").any():
            wide = dropin_table(dropin)
            cols = [c for c in wide.columns if c.endswith("mean cosine")]
            # the kind most variants ran on; passages (the longer texts) on a tie
            col = max(cols, key=lambda c: (wide[c].notna().sum(), c.startswith("passages")))
            kind = col.split()[0]
            wide = wide.assign(loss=1.0 - wide[col]).rename(columns={"loss": "one_minus"})
            points = speed_points(wide, speed.df, "one_minus", n)
            points["x"] = points["x"].clip(lower=1e-7)  # exact variants sit at the left edge
            if not points.empty:
                figures.append(quality_vs_speed(
                    points, f"1 - mean cosine to the exact model, drop-in, held-out "
                            f"{kind} (clipped at 1e-7)",
                    f"drop-in quality vs speed: time at N={n}, fwd, non-causal ({where})",
                    plots / "dropin-vs-speed")[0])
                exact = ", ".join(exact_variants(dropin, kind)) or "none"
                notes.append(f"In the drop-in figure, variants exact at every length of the "
                             f"held-out {kind} (their points measure no approximation): "
                             f"{exact}.")
        notes.insert(0, f"Speed: `time_ms` of the fwd, non-causal rows at N={n} of "
                        f"`{Path(args.speed_run).as_posix()}` ({where}); quality from this CPU "
                        "run. Variants missing from either run have no point.")
        print(f"wrote {len(figures)} figures to {plots}")
    note = " ".join(notes)
    if args.readme:
        rewrite(args.readme, section(run, args.length, figures, args.readme.resolve().parent,
                                     note, studies), MARKERS)
        print(f"rewrote the quality section of {args.readme}")
    return 0
