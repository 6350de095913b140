"""The task suite: train a small Transformer with the variant as its attention, score it.

One case is one (task setting, variant, seed): the setting's task at its length (the case's
`seq_len`, `inputs` = `task:NAME`), trained from the seed for the setting's token budget with its
recipe (`suites.tasks.presets`). Metrics: the task's held-out score (`accuracy`, or `bpc` for
the character LM), `train_tokens_per_s`, `peak_mem_mib` (the whole training run, beyond what was
allocated before it), `final_train_loss` and `attn_fwd_bwd_ms` (the variant alone, forward and
backward at the model's attention shape: the kernel time at the task's length). A loss that
turns NaN or Inf makes the case a `nan` row naming the step. The learning curve of each case is
written to `curves/<variant>_<task>_N<len>_seed<seed>.csv` in the run directory.
"""
from __future__ import annotations

import csv
from pathlib import Path

from harness.failures import Failure
from harness.inputs import TASK_PREFIX
from harness.memory import cpu_memory_supported, peak_extra_mib
from harness.registry import Shape
from harness.suite import CaseCost, Metric, Summary, register_suite
from harness.trial import Trial
from suites.tasks.presets import Setting, settings_for
from suites.tasks.train import Outcome, train
from suites.time import run_time

INPUTS_PREFIX = TASK_PREFIX
CURVES_DIR = "curves"


def task_settings(config) -> list[tuple[str, Shape, Setting]]:
    """(inputs name, attention shape, setting) of every task setting of the run."""
    out = []
    for s in settings_for(config.preset, config.device, config.tasks):
        s.make()  # a size the task cannot make is bad input, before anything runs
        shape = Shape(s.recipe.batch, s.recipe.heads, s.seq_len, s.recipe.dim // s.recipe.heads,
                      s.make().causal, config.torch_dtype)
        out.append((INPUTS_PREFIX + s.task, shape, s))
    return out


def task_problems(config) -> list[tuple[str, Shape]]:
    """(inputs name, attention shape) of every task setting of the run."""
    return [(name, shape) for name, shape, _ in task_settings(config)]


def setting_of(trial: Trial) -> Setting:
    """The setting a trial's case trains: its task (from `inputs`) at its length."""
    name = trial.inputs_name.removeprefix(INPUTS_PREFIX)
    for _, shape, setting in task_settings(trial.config):
        if setting.task == name and shape.seq_len == trial.shape.seq_len:
            return setting
    raise Failure("error", f"no {name} setting at N={trial.shape.seq_len} in this preset")


def curve_path(run_dir: Path, trial: Trial, setting: Setting, seed: int) -> Path:
    name = f"{trial.variant.label}_{setting.task}_N{setting.seq_len}_seed{seed}.csv"
    return Path(run_dir) / CURVES_DIR / name.replace("/", "-")


def write_curve(path: Path, outcome: Outcome) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=("step", "tokens", "train_loss"),
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(outcome.curve)


def task_cost(case: CaseCost) -> float:
    """The setting's training steps, each a forward and backward of every layer's attention
    and about as much again for the rest of the model."""
    name = case.inputs.removeprefix(INPUTS_PREFIX)
    setting = next(s for s in settings_for(case.config.preset, case.config.device,
                                           case.config.tasks)
                   if s.task == name and s.seq_len == case.shape.seq_len)
    steps = setting.recipe.steps(setting.seq_len)
    return steps * setting.recipe.layers * 2 * case.call_s("fwd_bwd")


@register_suite(
    "task", modes=("fwd_bwd",), primary="accuracy", default=False, order=40,
    select_modes=lambda requested: ("fwd_bwd",), problems=task_problems, seeded=True,
    cost=task_cost,
    metrics=(
        Metric("accuracy", "fraction", higher_is_better=True),
        Metric("bpc", "bits/char", label="bits per character"),
        Metric("train_tokens_per_s", "tokens/s", higher_is_better=True),
        Metric("final_train_loss", "nats"),
        Metric("peak_mem_mib", "MiB", label="peak memory"),
        Metric("attn_fwd_bwd_ms", "ms", label="attention fwd+bwd"),
    ),
    summary=(Summary("accuracy", "task accuracy (held out)", "{:.3f}"),
             Summary("bpc", "task bits per character (held out)", "{:.3f}")),
)
def run_task(trial: Trial, mode: str) -> dict[str, float]:
    """Train and score one (setting, variant, seed) case; see the module docstring."""
    setting = setting_of(trial)
    seed = int(trial.case.seed)
    task = setting.make()
    outcome = Outcome()

    def run():
        nonlocal outcome
        outcome = train(task, lambda: trial.variant.build(trial.shape), setting.recipe,
                        trial.device, trial.shape.dtype, seed, trial.progress)

    memory = trial.device.type == "cuda" or cpu_memory_supported() is None
    peak = peak_extra_mib(run, trial.device) if memory else None
    trial.observed["task"] = setting.describe()
    if trial.run_dir is not None:
        write_curve(curve_path(trial.run_dir, trial, setting, seed), outcome)
    if outcome.diverged_at is not None:
        raise Failure("nan", f"training loss turned NaN/Inf at step {outcome.diverged_at}")
    metrics = dict(outcome.metrics)
    if peak is not None:
        metrics["peak_mem_mib"] = peak
    metrics["attn_fwd_bwd_ms"] = run_time(trial, "fwd_bwd")["time_ms"]
    return metrics
