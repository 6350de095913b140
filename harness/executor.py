"""Running cases in this process: build a variant for a shape once, then measure each case.

A case that fails at run time (OOM, missing package, kernel error, NaN) becomes a row with a
status and a reason. The same code runs in the sweep's own process (`--in-process`) and inside
the isolating worker process (`harness.isolation`). What a case observes rather than
configures (the SDPA backend that ran, the rows an accuracy reference compared, and whatever a
built variant's `observations()` method returns after the measured calls, e.g. the launch
configuration a kernel chose) goes to the rows' `observed` column.
"""
from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import torch

from harness.config import BenchConfig
from harness.failures import Failure, classify
from harness.quiet import silenced_fds
from harness.registry import Shape, VariantConfig
from harness.results import Case, Row
from harness.roofline import Roofline
from harness.inputs import source
from harness.suite import Suite, get_suite
from harness.trial import Trial

Todo = list[tuple[Case, str]]  # (case, suite name) pairs of one variant at one shape


class CaseRunner:
    """Measures the cases of one variant configuration at one shape, in this process."""

    def __init__(self, config: BenchConfig, roofline: Roofline | None = None,
                 run_dir: Path | None = None):
        self.config = config
        self.device = torch.device(config.device)
        self.roofline = roofline
        self.run_dir = run_dir  # where suites write files of their own (learning curves)
        self.progress = None  # (done, total) callback for the steps of a long case
        self._inputs: tuple[tuple[str, Shape], tuple[torch.Tensor, ...]] | None = None

    def inputs(self, shape: Shape, name: str = "randn") -> tuple[torch.Tensor, ...]:
        """q, k, v of `shape` from input source `name` (`harness.inputs`; randn seeded by the
        length), made once per (source, shape) and shared by its variants."""
        if self._inputs is None or self._inputs[0] != (name, shape):
            self._inputs = None
            self.free_memory()
            seed = self.config.seed + shape.seq_len
            self._inputs = ((name, shape), source(name).tensors(shape, self.device, seed))
        return self._inputs[1]

    def run_group(self, vc: VariantConfig, shape: Shape, todo: Todo,
                  inputs: str = "randn") -> Iterator[list[Row]]:
        """Yield the rows of each case in `todo`: the variant is built once for all of them."""
        trial, failure = self.try_prepare(vc, shape, inputs)
        for case, suite_name in todo:
            yield self.rows_of(trial, failure, case, suite_name)

    def try_prepare(self, vc: VariantConfig, shape: Shape,
                    inputs: str = "randn") -> tuple[Trial | None, Failure | None]:
        """The prepared trial, or the failure every case of this variant at this shape gets."""
        try:
            return self.prepare(vc, shape, inputs), None
        except Exception as exc:  # noqa: BLE001 - every failure becomes a result row
            self.free_memory()
            return None, classify(exc)

    def rows_of(self, trial: Trial | None, failure: Failure | None, case: Case,
                suite_name: str) -> list[Row]:
        """One case's rows: its measurements, or one row with the failure's status."""
        suite = get_suite(suite_name)
        if failure is not None:
            return [Row(case, suite.primary, None, failure.status, failure.reason)]
        return self.run_case(trial, case, suite)

    def run_case(self, trial: Trial, case: Case, suite: Suite) -> list[Row]:
        """The rows of one case: each metric the suite returns, with what was observed."""
        trial.flags.clear()
        trial.details.clear()
        trial.case = case
        trial.observed = dict(trial.built)
        try:
            metrics = suite.run(trial, case.mode)
            if hasattr(trial.fn, "observations"):  # e.g. the launch config a kernel chose
                trial.observed.update(trial.fn.observations())
        except Exception as exc:  # noqa: BLE001 - every failure becomes a result row
            failure = classify(exc)
            self.free_memory()
            return [Row(case, suite.primary, None, failure.status, failure.reason,
                        observed=dict(trial.observed))]  # what the case saw before it failed
        undeclared = [m for m in metrics if m not in suite.metrics]
        if undeclared:
            return [Row(case, suite.primary, None, "error",
                        f"suite {suite.name} returned undeclared metric(s) "
                        f"{', '.join(undeclared)}; declare them in its register_suite(metrics=...)")]
        bad = [m for m, v in metrics.items() if v != v or v in (float("inf"), float("-inf"))]
        if bad:
            return [Row(case, suite.primary, None, "nan", f"non-finite {', '.join(bad)}")]
        rows = [Row(case, m, v, "inexact" if m in trial.flags else "ok", trial.flags.get(m, ""),
                    observed=dict(trial.observed)) for m, v in metrics.items()]
        if rows:
            rows[0].details = list(trial.details)
        return rows

    def prepare(self, vc: VariantConfig, shape: Shape, inputs_name: str = "randn") -> Trial:
        """Build the variant for `shape`; raise `Failure` when it cannot or should not run
        (or its first output is not a finite tensor of q's shape, dtype and device)."""
        spec = vc.spec
        reason = (spec.unavailable_reason(self.device, vc.params)
                  or spec.unsupported_reason(shape, vc.params))
        if reason:
            raise Failure("skipped", reason)
        inputs = self.inputs(shape, inputs_name)
        torch.manual_seed(self.config.seed)  # learnable weights start identical in every run
        fn = vc.build(shape)
        if isinstance(fn, torch.nn.Module):
            fn = fn.to(self.device)
        trial = Trial(vc, fn, shape, inputs, self.device, self.config, self.roofline,
                      inputs_name=inputs_name, run_dir=self.run_dir, progress=self.progress)
        out = trial.forward()  # the first call compiles; a NaN here fails every case
        wrong = output_mismatch(out, inputs[0])
        if wrong:
            raise Failure("error", wrong)
        if not torch.isfinite(out).all():
            raise Failure("nan", "forward output has NaN or Inf")
        if hasattr(fn, "detect_backend"):
            with silenced_fds():  # the profiler prints to the terminal from C++
                trial.built["backend_ran"] = fn.detect_backend(*inputs)
        return trial

    def free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            try:
                torch.cuda.empty_cache()
            except RuntimeError:  # a faulted kernel left the context unusable: the case's
                pass  # row says so, and the isolating worker retires

    def close(self) -> None:
        """Drop the cached inputs."""
        self._inputs = None
        self.free_memory()


def output_mismatch(out, q: torch.Tensor) -> str | None:
    """Why `out` is not an attention output for `q` (a tensor of q's shape, dtype and device),
    or None when it is."""
    if not isinstance(out, torch.Tensor):
        return f"output is a {type(out).__name__}, not a tensor like q"
    got = (tuple(out.shape), out.dtype, out.device)
    want = (tuple(q.shape), q.dtype, q.device)
    if got == want:
        return None
    show = "shape {} dtype {} device {}".format
    return f"output has {show(*got)}; expected q's {show(*want)}"
