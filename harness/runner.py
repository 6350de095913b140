"""The sweep: every (causal, length, variant, suite, mode) case, written as it finishes.

A case that fails at run time (OOM, missing package, kernel error, NaN, a crash or hang of the
worker process) becomes a result row with a status and a reason, and the sweep goes on. After
a variant runs out of memory at length N, its larger lengths (same mode, same causality) are
recorded as `oom` without running. A resumed run skips every case already in results.csv.
Cases run in a worker process (`harness.isolation`) unless the options ask for this process.
"""
from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)  # fmt: skip

from harness.config import DTYPES, BenchConfig, ConfigError, RunOptions, run_suites
from harness.environment import fingerprint
from harness.executor import CaseRunner
from harness.inputs import input_files, sources
from harness.failures import Failure, classify  # noqa: F401 - re-exported for callers
from harness.registry import RegistryError, Shape, VariantConfig, expand_configs, all_variants
from harness.registry import get_variant, parse_param_overrides
from harness.results import Case, ResultsWriter, Row, finished_case_keys, load_existing, read_meta
from harness.results import RESULTS_FILE, DetailsWriter, cut_unfinished_case, write_meta
from harness.roofline import Roofline, measure_roofline
from harness.suite import get_suite

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_configs(config: BenchConfig) -> list[VariantConfig]:
    """The variant configurations of the run: named ones (or all), with swept params."""
    names = config.variants or tuple(spec.name for spec in all_variants())
    for name in names:
        get_variant(name)
    return expand_configs(names, parse_param_overrides(config.params))


def sweep_problems(config: BenchConfig) -> Iterator[tuple[str, Shape]]:
    """(inputs name, shape) of every problem of the sweep: per input source (which fixes the
    shape of captured inputs), causal flags, then lengths in increasing order; for the task
    suite with problems of its own (it runs alone), those."""
    own = [get_suite(s) for s in config.suites if get_suite(s).problems is not None]
    if own:
        yield from own[0].problems(config)
        return
    for src in sources(config):
        for causal in config.causal:
            for n in sorted(config.seq_lens):
                yield src.name, src.shape(config, n, causal)


def sweep_shapes(config: BenchConfig) -> Iterator[Shape]:
    """Every shape of the sweep (see `sweep_problems`)."""
    return (shape for _, shape in sweep_problems(config))


def check_explicit_lengths(config: BenchConfig, configs: list[VariantConfig]) -> None:
    """A variant the user named that cannot take a requested shape is bad input."""
    if not config.variants:
        return
    for vc in configs:
        for shape in sweep_shapes(config):
            if shape.causal not in vc.spec.causal:  # a missing form is a skipped row
                continue
            reason = vc.spec.unsupported_reason(shape, vc.params)
            if reason:
                raise RegistryError(f"{vc.label} cannot run N={shape.seq_len} "
                                    f"causal={shape.causal}: {reason}")


def check_params(config: BenchConfig, configs: list[VariantConfig]) -> None:
    """`--param` is bad input when it names a variant outside the sweep, or sets a value that
    makes the variant refuse a shape of the sweep which its defaults take."""
    overrides = parse_param_overrides(config.params)
    if config.variants:
        for name in overrides:
            if name not in config.variants:
                raise RegistryError(f"--param names variant '{name}', which is not in this "
                                    f"sweep; variants: {', '.join(config.variants)}")
    for vc in configs:
        if vc.spec.name not in overrides:
            continue
        for shape in sweep_shapes(config):
            if shape.causal not in vc.spec.causal:
                continue
            if vc.spec.unsupported_reason(shape, vc.spec.params) is not None:
                continue  # the shape itself is out of reach: a skipped row, not the param
            reason = vc.spec.unsupported_reason(shape, vc.params)
            if reason:
                raise RegistryError(f"--param value not allowed: {vc.label} cannot run "
                                    f"N={shape.seq_len} causal={shape.causal}: {reason}")


def make_case(vc: VariantConfig, shape: Shape, suite: str, mode: str, device: str,
              inputs: str = "randn") -> Case:
    """The result-row identity of one variant configuration at one shape, suite and mode."""
    return Case(
        variant=vc.label, family=vc.spec.family,
        params=json.dumps(vc.params, sort_keys=True), suite=suite, mode=mode,
        batch=shape.batch, heads=shape.heads, seq_len=shape.seq_len,
        head_dim=shape.head_dim, dtype=DTYPE_NAMES[shape.dtype], causal=shape.causal,
        device=device, inputs=inputs,
    )  # fmt: skip


def previous_ooms(df) -> dict[tuple, int]:
    """OOM lengths already recorded per (variant, causal, mode): a resumed run keeps
    skipping what ran out of memory."""
    out: dict[tuple, int] = {}
    for r in df[df.status == "oom"].itertuples():
        key = (r.variant, str(r.causal) == "True", r.mode)
        out[key] = min(out.get(key, r.seq_len), r.seq_len)
    return out


class Sweep:
    """Runs one configuration into one run directory.

    After `run`, `written` is the number of cases this call wrote and `stopped_at` the first
    non-ok row when `options.fail_fast` ended the sweep early (else None).
    """

    def __init__(self, config: BenchConfig, run_dir: Path, console: Console | None = None,
                 options: RunOptions | None = None):
        self.config = config
        self.options = options or RunOptions()
        self.run_dir = Path(run_dir)
        self.console = console or Console(stderr=True)
        self.device = torch.device(config.device)
        self.configs = resolve_configs(config)
        check_explicit_lengths(config, self.configs)
        check_params(config, self.configs)
        self.rows_dir = self.run_dir  # where this process writes rows and worker logs
        existing = self.existing_rows()  # read once: finished cases and past OOMs
        self.finished = finished_case_keys(existing)
        self.oom_at = previous_ooms(existing)
        self.roofline: Roofline | None = None
        self.written = 0
        self.stopped_at: Row | None = None

    def existing_rows(self):
        """The rows already written in the run directory (a DataFrame), less the case whose last
        line a killed run left unfinished (dropped from the file, with a note: it runs again)."""
        self.drop_unfinished_case(self.run_dir / RESULTS_FILE)
        return load_existing(self.run_dir)

    def drop_unfinished_case(self, path: Path) -> None:
        """Cut the case a killed process left unfinished at the end of `path`, saying so."""
        dropped = cut_unfinished_case(path)
        if dropped:
            self.console.print(f"{path}: dropped an unfinished last line and the rows of its "
                               f"case ({dropped} rows), left by a killed run; the case runs "
                               "again", highlight=False, markup=False)

    def problems(self) -> Iterator[tuple[str, Shape]]:
        return sweep_problems(self.config)

    def case(self, vc: VariantConfig, shape: Shape, suite: str, mode: str,
             inputs: str = "randn") -> Case:
        return make_case(vc, shape, suite, mode, self.device.type, inputs)

    def planned(self, vc: VariantConfig, shape: Shape,
                inputs: str = "randn") -> list[tuple[Case, str]]:
        """(case, suite name) pairs of this variant at this shape, in the order they run."""
        return [(replace(self.case(vc, shape, name, mode, inputs), seed=seed), name)
                for name in run_suites(self.config)
                for mode in get_suite(name).modes_of(self.config.modes)
                for seed in self.case_seeds(name)]

    def cases_for(self, vc: VariantConfig, shape: Shape,
                  inputs: str = "randn") -> list[tuple[Case, str]]:
        """(case, suite name) pairs of this variant at this shape still to be run."""
        return [(case, name) for case, name in self.planned(vc, shape, inputs)
                if case.key not in self.finished]

    def case_seeds(self, suite: str) -> list[int | str]:
        """A seeded suite's seeds (one case each: `--seed` and the next `--seeds` - 1); a
        suite without seeds has one case, seed ""."""
        if not get_suite(suite).seeded:
            return [""]
        return [self.config.seed + i for i in range(self.config.seeds)]

    def total_cases(self) -> int:
        return sum(len(self.cases_for(vc, shape, name))
                   for name, shape in self.problems() for vc in self.configs)

    def write_meta(self, command: list[str]) -> None:
        """Write meta.json; a resumed run keeps its original meta and logs the resume."""
        previous = read_meta(self.run_dir)
        if previous:
            here = fingerprint(self.device)
            check_same_gpu(self.run_dir, previous, here)
            resume = {"command": shlex.join(command), "git_sha": here["git_sha"],
                      "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            write_meta(self.run_dir, {**previous, "resumes": [*previous.get("resumes", []), resume]})
            return
        write_meta(self.run_dir, self.new_meta(command))

    def new_meta(self, command: list[str]) -> dict:
        """The meta.json of a new run: command, configuration, the size and SHA-256 of each
        `file:PATH` input, environment, roofline."""
        return {
            "run_id": self.run_dir.name,
            "command": shlex.join(command),
            "preset": self.config.preset,
            "config": self.config.as_dict(),
            "input_files": input_files(self.config.inputs),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **fingerprint(self.device),
            "roofline": self.roofline.as_dict() if self.roofline else None,
        }

    def executor(self):
        """Where cases run: the isolating worker process, or this process."""
        if self.options.isolate:
            from harness.isolation import IsolatedRunner

            return IsolatedRunner(self.config, self.roofline, self.rows_dir,
                                  self.options.case_timeout)
        return CaseRunner(self.config, self.roofline, self.run_dir)

    def run(self, command: list[str] | None = None) -> Path:
        """Run every unfinished case; returns the run directory."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the run directory {self.run_dir}: "
                              f"{exc.strerror or exc}") from None
        stored = read_meta(self.run_dir).get("roofline")
        if stored:  # a resumed run keeps the ceilings its first part was measured against
            self.roofline = Roofline(**stored)
        elif self.device.type == "cuda":
            self.roofline = measure_roofline(self.device)
            torch.cuda.empty_cache()
        self.write_meta(command or sys.argv)
        writer = ResultsWriter(self.rows_dir, self.run_dir.name)
        details = DetailsWriter(self.rows_dir, self.run_dir.name)
        executor = self.executor()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
        try:
            with Progress(*columns, console=self.console, transient=False) as progress:
                task = progress.add_task("cases", total=self.total_cases())
                steps = []  # a bar for the steps of a long case, made when one reports

                def on_steps(done: int, total: int) -> None:
                    if not steps:
                        steps.append(progress.add_task("  steps of the case", total=total))
                    progress.update(steps[0], completed=done, total=total)

                executor.progress = on_steps
                for name, shape in self.problems():
                    for vc in self.configs:
                        todo = self.cases_for(vc, shape, name)
                        if not todo:
                            continue
                        progress.update(task, description=f"{vc.label} N={shape.seq_len}"
                                        f"{' causal' if shape.causal else ''}"
                                        f"{'' if name == 'randn' else ' ' + name}")
                        for rows in self.run_variant(executor, vc, shape, todo, name):
                            writer.write(rows)
                            details.write(rows[0].case, rows[0].details)
                            self.written += 1
                            progress.advance(task)
                            failed = [r for r in rows if r.status != "ok"]
                            if failed and self.options.fail_fast:
                                self.stopped_at = failed[0]
                                return self.run_dir
                    if isinstance(executor, CaseRunner):
                        executor.close()
        finally:
            executor.close()
            writer.close()
            details.close()
        return self.run_dir

    def run_variant(self, executor, vc: VariantConfig, shape: Shape, todo,
                    inputs: str = "randn") -> Iterator[list[Row]]:
        """Yield the rows of each case of one variant at one shape; lengths above one where
        the same (variant, causal, mode) ran out of memory are `oom` rows without running."""
        to_run = []
        for case, suite_name in todo:
            oom_key = (vc.label, shape.causal, case.mode)
            if oom_key in self.oom_at and shape.seq_len > self.oom_at[oom_key]:
                yield [Row(case, get_suite(suite_name).primary, None, "oom",
                           f"skipped after OOM at N={self.oom_at[oom_key]}")]
            else:
                to_run.append((case, suite_name))
        if not to_run:
            return
        for rows in executor.run_group(vc, shape, to_run, inputs):
            if any(r.status == "oom" for r in rows):
                self.oom_at.setdefault((vc.label, shape.causal, rows[0].case.mode), shape.seq_len)
            yield rows


def check_same_gpu(run_dir: Path, previous: dict, here: dict) -> None:
    """A run is measured on one GPU model: continuing it on another is refused."""
    if previous.get("gpu") != here["gpu"]:
        raise ConfigError(f"cannot resume {run_dir}: it ran on {previous.get('gpu')}, this "
                          f"machine has {here['gpu']}")


def new_run_dir(root: Path, config: BenchConfig) -> Path:
    """results/runs/<timestamp>-<device>-<preset>, with a -2, -3 ... suffix if that exists."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{stamp}-{config.device}-{config.preset}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path
