"""The sweep: every (causal, length, variant, suite, mode) case, written as it finishes.

A case that fails at run time (OOM, missing package, kernel error, NaN) becomes a result row
with a status and a reason, and the sweep goes on. After a variant runs out of memory at
length N, its larger lengths (same mode, same causality) are recorded as `oom` without
running. A resumed run skips every case already in results.csv.
"""
from __future__ import annotations

import gc
import json
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.config import DTYPES, BenchConfig, ConfigError
from harness.environment import fingerprint
from harness.inputs import sources
from harness.registry import RegistryError, Shape, VariantConfig, expand_configs, all_variants
from harness.registry import get_variant, parse_param_overrides
from harness.results import Case, ResultsWriter, Row, finished_case_keys, load_existing, read_meta
from harness.results import DetailsWriter, write_meta
from harness.roofline import Roofline, measure_roofline
from harness.trial import Trial
from suites import SUITES, suite_modes

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class Failure(Exception):
    """A case that ended without measurements: status in {oom, skipped, error, nan}."""

    status: str
    reason: str


def classify(exc: BaseException) -> Failure:
    """Map an exception raised by a case to its result status and a one-line reason."""
    if isinstance(exc, Failure):
        return exc
    message = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in message.lower():
        return Failure("oom", f"out of memory: {message}")
    return Failure("error", f"{type(exc).__name__}: {message}")


def resolve_configs(config: BenchConfig) -> list[VariantConfig]:
    """The variant configurations of the run: named ones (or all), with swept params."""
    names = config.variants or tuple(spec.name for spec in all_variants())
    for name in names:
        get_variant(name)
    return expand_configs(names, parse_param_overrides(config.params))


def check_explicit_lengths(config: BenchConfig, configs: list[VariantConfig]) -> None:
    """A variant the user named that cannot take a requested shape is bad input."""
    if not config.variants:
        return
    for vc in configs:
        for src in sources(config):
            for n in config.seq_lens:
                for causal in config.causal:
                    shape = src.shape(config, n, causal)
                    if causal not in vc.spec.causal:  # a missing form is a skipped row
                        continue
                    reason = vc.spec.unsupported_reason(shape, vc.params)
                    if reason:
                        where = "" if src.name == "randn" else f" on inputs {src.name}"
                        raise RegistryError(
                            f"{vc.label} cannot run N={n} causal={causal}{where}: {reason}")


def previous_ooms(df) -> dict[tuple, int]:
    """OOM lengths already recorded per (variant, causal, mode): a resumed run keeps
    skipping what ran out of memory."""
    out: dict[tuple, int] = {}
    for r in df[df.status == "oom"].itertuples():
        key = (r.variant, str(r.causal) == "True", r.mode)
        out[key] = min(out.get(key, r.seq_len), r.seq_len)
    return out


class Sweep:
    """Runs one configuration into one run directory."""

    def __init__(self, config: BenchConfig, run_dir: Path, console: Console | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.console = console or Console(stderr=True)
        self.device = torch.device(config.device)
        self.configs = resolve_configs(config)
        check_explicit_lengths(config, self.configs)
        existing = load_existing(self.run_dir)  # read once: finished cases and past OOMs
        self.finished = finished_case_keys(existing)
        self.oom_at = previous_ooms(existing)
        self.roofline: Roofline | None = None
        self.sources = sources(config)

    def shapes(self) -> Iterator[tuple[str, Shape]]:
        """(inputs name, shape) of every problem of the run: per source, causal, length."""
        for src in self.sources:
            for causal in self.config.causal:
                for n in sorted(self.config.seq_lens):
                    yield src.name, src.shape(self.config, n, causal)

    def case(self, vc: VariantConfig, shape: Shape, suite: str, mode: str,
             inputs: str = "randn") -> Case:
        return Case(
            variant=vc.label, family=vc.spec.family,
            params=json.dumps(vc.params, sort_keys=True), suite=suite, mode=mode,
            batch=shape.batch, heads=shape.heads, seq_len=shape.seq_len,
            head_dim=shape.head_dim, dtype=DTYPE_NAMES[shape.dtype], causal=shape.causal,
            device=self.device.type, inputs=inputs,
        )  # fmt: skip

    def cases_for(self, vc: VariantConfig, shape: Shape, inputs: str = "randn"
                  ) -> list[tuple[Case, str]]:
        """(case, suite name) pairs of this variant at this shape still to be run."""
        todo = []
        for name in self.config.suites:
            for mode in suite_modes(SUITES[name], self.config.modes):
                case = self.case(vc, shape, name, mode, inputs)
                if case.key not in self.finished:
                    todo.append((case, name))
        return todo

    def total_cases(self) -> int:
        return sum(len(self.cases_for(vc, s, name)) for name, s in self.shapes()
                   for vc in self.configs)

    def write_meta(self, command: list[str]) -> None:
        """Write meta.json; a resumed run keeps its original meta and logs the resume."""
        previous = read_meta(self.run_dir)
        if previous:
            here = fingerprint(self.device)
            if previous.get("gpu") != here["gpu"]:
                raise ConfigError(f"cannot resume {self.run_dir}: it ran on {previous.get('gpu')}"
                                  f", this machine has {here['gpu']}")
            resume = {"command": shlex.join(command), "git_sha": here["git_sha"],
                      "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            write_meta(self.run_dir, {**previous, "resumes": [*previous.get("resumes", []), resume]})
            return
        meta = {
            "run_id": self.run_dir.name,
            "command": shlex.join(command),
            "preset": self.config.preset,
            "config": self.config.as_dict(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **fingerprint(self.device),
            "roofline": self.roofline.as_dict() if self.roofline else None,
        }
        write_meta(self.run_dir, meta)

    def run(self, command: list[str] | None = None) -> Path:
        """Run every unfinished case; returns the run directory."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        stored = read_meta(self.run_dir).get("roofline")
        if stored:  # a resumed run keeps the ceilings its first part was measured against
            self.roofline = Roofline(**stored)
        elif self.device.type == "cuda":
            self.roofline = measure_roofline(self.device)
        self.write_meta(command or sys.argv)
        writer = ResultsWriter(self.run_dir, self.run_dir.name)
        self.details = DetailsWriter(self.run_dir, self.run_dir.name)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        try:
            with Progress(*columns, console=self.console, transient=False) as progress:
                task = progress.add_task("cases", total=self.total_cases())
                by_name = {src.name: src for src in self.sources}
                for name, shape in self.shapes():
                    todos = [self.cases_for(vc, shape, name) for vc in self.configs]
                    if not any(todos):
                        continue
                    seed = self.config.seed + shape.seq_len
                    inputs = by_name[name].tensors(shape, self.device, seed)
                    for vc, todo in zip(self.configs, todos):
                        if not todo:
                            continue
                        progress.update(task, description=f"{vc.label} N={shape.seq_len}"
                                        f"{' causal' if shape.causal else ''}"
                                        f"{'' if name == 'randn' else ' ' + name}")
                        for rows in self.run_variant(vc, shape, inputs, todo, name):
                            writer.write(rows)
                            progress.advance(task)
                    del inputs
                    self.free_memory()
        finally:
            writer.close()
            self.details.close()
        return self.run_dir

    def run_variant(self, vc: VariantConfig, shape: Shape, inputs, todo,
                    inputs_name: str = "randn") -> Iterator[list[Row]]:
        """Yield the rows of each case of one variant at one shape."""
        trial, failure = None, None
        try:
            trial = self.prepare(vc, shape, inputs)
            trial.inputs_name = inputs_name
        except Exception as exc:  # noqa: BLE001 - every failure becomes a result row
            failure = classify(exc)
            self.free_memory()
        for case, suite_name in todo:
            suite = SUITES[suite_name]
            oom_key = (vc.label, shape.causal, case.mode)
            if oom_key in self.oom_at and shape.seq_len > self.oom_at[oom_key]:
                yield [Row(case, suite.primary_metric, None, "oom",
                           f"skipped after OOM at N={self.oom_at[oom_key]}")]
                continue
            if failure is not None:
                if failure.status == "oom":
                    self.oom_at.setdefault(oom_key, shape.seq_len)
                yield [Row(case, suite.primary_metric, None, failure.status, failure.reason)]
                continue
            yield self.run_case(trial, case, suite)

    def run_case(self, trial: Trial, case: Case, suite) -> list[Row]:
        try:
            metrics = suite.run(trial, case.mode)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a result row
            failure = classify(exc)
            trial.details.clear()
            self.free_memory()
            if failure.status == "oom":
                self.oom_at.setdefault((case.variant, case.causal, case.mode), case.seq_len)
            return [Row(case, suite.primary_metric, None, failure.status, failure.reason)]
        bad = [m for m, v in metrics.items() if v != v or v in (float("inf"), float("-inf"))]
        if bad:
            trial.details.clear()
            return [Row(case, suite.primary_metric, None, "nan", f"non-finite {', '.join(bad)}")]
        self.details.write(case, trial.details)
        trial.details.clear()
        return [Row(case, m, v, extra_params=dict(trial.extra_params)) for m, v in metrics.items()]

    def prepare(self, vc: VariantConfig, shape: Shape, inputs) -> Trial:
        """Build the variant for `shape`; raise `Failure` when it cannot or should not run."""
        reason = vc.spec.unavailable_reason(self.device) or vc.spec.unsupported_reason(shape, vc.params)
        if reason:
            raise Failure("skipped", reason)
        torch.manual_seed(self.config.seed)  # learnable weights start identical in every run
        fn = vc.build(shape)
        if isinstance(fn, torch.nn.Module):
            fn = fn.to(self.device)
        trial = Trial(vc, fn, shape, inputs, self.device, self.config, self.roofline)
        out = trial.forward()  # the first call compiles; a NaN here fails every case
        if not torch.isfinite(out).all():
            raise Failure("nan", "forward output has NaN or Inf")
        if hasattr(fn, "detect_backend"):
            trial.extra_params["backend_ran"] = fn.detect_backend(*inputs)
        return trial

    def free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def new_run_dir(root: Path, config: BenchConfig) -> Path:
    """results/runs/<timestamp>-<device>-<preset>."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stamp}-{config.device}-{config.preset}"
