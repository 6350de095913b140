"""The suite registry: a decorator that records what a suite measures and how to read it.

A suite is one module that registers its run function::

    @register_suite(
        "time", modes=("fwd", "bwd", "fwd_bwd"), primary="time_ms", scaling=True,
        metrics=(Metric("time_ms", "ms", label="time"),
                 Metric("tflops", "TFLOP/s", higher_is_better=True)),
        summary=(Summary("time_ms", "time (ms, median)", "{:.3g}"),),
    )
    def run_time(trial, mode):
        return {"time_ms": ..., "tflops": ...}

The run function gets a prepared `harness.trial.Trial` and one of its modes and returns
`{metric: value}`; every metric it returns must be declared in `metrics` (the executor makes
an undeclared one an `error` row). A metric's declaration gives its unit (the CSV's `unit`
column), whether higher is better (`compare`), and optionally the metrics that hold its
p20/p80 spread (`band`) or the metric it is a rate of (`rate_of`), from which `compare` takes
its noise band. The `primary` metric is the one a failed case's row carries. `scaling=True`
puts the primary metric in the scaling figure and the log-log slopes. `summary` lists the
tables printed at the end of a run. `default=False` keeps a suite out of runs that do not
name it. `order` places the suite in listings, in a run and in the summary (built-ins: time
10, memory 20, accuracy 30). `problems` (config -> [(inputs name, Shape)]) gives a suite its
own problems instead of the sweep's lengths and input sources (it then runs alone), and
`seeded` makes one case per seed of `--seeds` (the `task` suite trains models this way).
`cost` (a `CaseCost` -> seconds) says roughly how long one case takes, in calls of the variant:
the CPU size warning and the sharded sweep's balance read it (default: three calls).

Built-in suites are the modules of the `suites` package (`suites.load_builtin_suites`); a
`--plugin` file may register more, and families of variants (`harness.registry`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

MODES = ("fwd", "bwd", "fwd_bwd")


class SuiteError(ValueError):
    """Bad registration or an unknown suite name; the message is one readable line."""


@dataclass(frozen=True)
class Metric:
    """A measured quantity: its name in the CSV, unit, and which direction is better.

    label: a readable name for axes ("time", "peak memory"); default the name.
    band: the metrics holding this one's p20 and p80 in the same row group.
    rate_of: the metric this one is a constant over (e.g. GB/s over time_ms): its noise band
        is that metric's, inverted.
    limit: a value above which the suite flags the row `inexact` (drawn on its plots).
    """

    name: str
    unit: str
    higher_is_better: bool = False
    label: str = ""
    band: tuple[str, str] | None = None
    rate_of: str | None = None
    limit: float | None = None

    @property
    def axis_label(self) -> str:
        """e.g. `time (ms)`."""
        return f"{self.label or self.name} ({self.unit})"


@dataclass(frozen=True)
class Summary:
    """One table of the end-of-run summary: a metric per variant, mode, causal flag and N."""

    metric: str
    title: str
    fmt: str = "{:.3g}"


@dataclass(frozen=True)
class CaseCost:
    """What a suite's `cost` function gets about one case: the run's configuration, the case's
    problem (inputs name, shape) and mode, and the rough seconds of one call of the variant in a
    mode at the run's rate (`call_s`) and of its float64 reference (`fp64_s`)."""

    config: object
    inputs: str
    shape: object
    mode: str
    call_s: Callable[[str], float]
    fp64_s: Callable[[str], float]


def few_calls(case: CaseCost) -> float:
    """The cost of a suite that declares none: three calls of the case's mode."""
    return 3 * case.call_s(case.mode)


@dataclass(frozen=True)
class Suite:
    """Everything the harness knows about one registered suite."""

    name: str
    run: Callable[..., dict[str, float]]
    modes: tuple[str, ...]
    primary: str
    metrics: dict[str, Metric] = field(default_factory=dict)
    summary: tuple[Summary, ...] = ()
    scaling: bool = False
    default: bool = True
    order: int = 100
    # The suite's own choice of modes from the requested ones (default: those it measures).
    select_modes: Callable[[tuple[str, ...]], tuple[str, ...]] | None = None
    description: str = ""
    # A suite with its own problems (config -> [(inputs name, Shape)]) runs alone, on those
    # instead of the sweep's lengths and input sources.
    problems: Callable | None = None
    # True: one case per training seed (config.seed, + 1, ... config.seeds of them).
    seeded: bool = False
    # Rough seconds of one case (see `CaseCost`).
    cost: Callable[[CaseCost], float] = few_calls

    @property
    def primary_metric(self) -> Metric:
        return self.metrics[self.primary]

    def modes_of(self, requested: tuple[str, ...]) -> tuple[str, ...]:
        """The modes of `requested` that this suite measures."""
        if self.select_modes is not None:
            return self.select_modes(requested)
        return tuple(m for m in requested if m in self.modes)


_SUITES: dict[str, Suite] = {}
_METRICS: dict[str, Metric] = {}


def register_suite(name: str, *, modes: tuple[str, ...], primary: str,
                   metrics: tuple[Metric, ...], summary: tuple[Summary, ...] = (),
                   **options) -> Callable:
    """Decorator registering a suite's run function under `name`.

    Args:
        name: unique suite name, used with `--suite` and in the CSV's `suite` column.
        modes: the modes it measures, of `MODES`.
        primary: the metric a failed case's row carries; one of `metrics`.
        metrics: every metric the run function may return.
        summary: the end-of-run tables, each of a declared metric.
        **options: `scaling`, `default`, `order`, `select_modes`, `description`, `problems`,
            `seeded`, `cost`.
    """
    declared = {m.name: m for m in metrics}
    problems = [f"mode '{m}' is not one of {', '.join(MODES)}" for m in modes if m not in MODES]
    problems += [f"metric '{n}' is not declared in metrics" for n in
                 (primary, *(s.metric for s in summary)) if n not in declared]
    problems += [f"metric '{m.name}' is declared by another suite as {_METRICS[m.name]}"
                 for m in metrics if _METRICS.get(m.name, m) != m]
    if problems:
        raise SuiteError(f"suite '{name}': {problems[0]}")

    def decorator(run: Callable) -> Callable:
        if name in _SUITES:
            raise SuiteError(f"suite '{name}' is already registered")
        doc = (run.__doc__ or "").strip().splitlines()
        options.setdefault("description", doc[0] if doc else "")
        _SUITES[name] = Suite(name, run, tuple(modes), primary, declared, tuple(summary),
                              **options)
        _METRICS.update(declared)
        return run

    return decorator


def unregister_suite(name: str) -> None:
    """Remove a suite and the metrics only it declared (tests and plugins use this)."""
    suite = _SUITES.pop(name, None)
    if suite is None:
        return
    kept = {m for s in _SUITES.values() for m in s.metrics}
    for metric in suite.metrics:
        if metric not in kept:
            _METRICS.pop(metric, None)


def get_suite(name: str) -> Suite:
    """Look a suite up by name; unknown names raise a one-line error listing the valid ones."""
    if name not in _SUITES:
        raise SuiteError(f"unknown suite '{name}'; valid: {', '.join(suite_names())}")
    return _SUITES[name]


def all_suites() -> list[Suite]:
    """Every registered suite, in `order`, then by name."""
    return sorted(_SUITES.values(), key=lambda s: (s.order, s.name))


def suite_names() -> tuple[str, ...]:
    return tuple(s.name for s in all_suites())


def default_suites() -> tuple[str, ...]:
    """The suites a run measures when none are named."""
    return tuple(s.name for s in all_suites() if s.default)


def find_metric(name: str) -> Metric | None:
    """The declaration of metric `name`, or None when no registered suite declares it."""
    return _METRICS.get(name)


def metric_unit(name: str) -> str:
    """The unit of metric `name` ('' when undeclared)."""
    metric = _METRICS.get(name)
    return metric.unit if metric else ""


def higher_is_better(name: str) -> bool:
    """Whether a larger value of metric `name` is better (False when undeclared)."""
    metric = _METRICS.get(name)
    return bool(metric and metric.higher_is_better)


def scaling_suites() -> dict[str, Metric]:
    """{suite: its primary metric} of the suites whose primary metric scales with N."""
    return {s.name: s.primary_metric for s in all_suites() if s.scaling}
