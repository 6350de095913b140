"""Measurement suites. Each maps a prepared `Trial` and a mode to named metric values."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from harness.trial import Trial
from suites.accuracy import run_accuracy
from suites.memory import run_memory
from suites.task import run_task
from suites.time import run_time


@dataclass(frozen=True)
class Suite:
    """A suite: its runner, the modes it measures, and the metric a failed case reports."""

    name: str
    run: Callable[[Trial, str], dict[str, float]]
    modes: tuple[str, ...]
    primary_metric: str
    # The suite's own choice of modes from the requested ones (default: those it measures).
    select_modes: Callable[[tuple[str, ...]], tuple[str, ...]] | None = None


def accuracy_modes(requested: tuple[str, ...]) -> tuple[str, ...]:
    """The output always; the gradients once when a backward mode is requested (under
    `fwd_bwd` if asked for, else `bwd`): they are the same in both."""
    return ("fwd", *[m for m in ("fwd_bwd", "bwd") if m in requested][:1])


SUITES: dict[str, Suite] = {
    "time": Suite("time", run_time, ("fwd", "bwd", "fwd_bwd"), "time_ms"),
    "memory": Suite("memory", run_memory, ("fwd", "bwd", "fwd_bwd"), "peak_mem_mib"),
    "accuracy": Suite("accuracy", run_accuracy, ("fwd", "bwd", "fwd_bwd"), "floor_ratio",
                      accuracy_modes),
    # Training is forward and backward; failed cases name `accuracy`, whatever the task's metric.
    "task": Suite("task", run_task, ("fwd_bwd",), "accuracy", lambda requested: ("fwd_bwd",)),
}


def suite_modes(suite: Suite, requested: tuple[str, ...]) -> tuple[str, ...]:
    """The modes of `requested` that `suite` measures."""
    if suite.select_modes is not None:
        return suite.select_modes(requested)
    return tuple(m for m in requested if m in suite.modes)
