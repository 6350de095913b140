"""The task suite: train a small Transformer with the variant as its attention, score it.

One case is one (task setting, variant, seed): the setting's task at its length (the case's
`seq_len`, `inputs` = `task:NAME`), trained from the seed for the setting's token budget with its
recipe (`suites.tasks.presets`). Metrics: the task's held-out score (`accuracy`, or `bpc` for
the character LM), `train_tokens_per_s`, `peak_mem_mib` (the whole training run, beyond what was
allocated before it; the task's data is made before it), `final_train_loss` and `attn_fwd_bwd_ms` (the variant alone, forward and
backward at the model's attention shape and the dtype it trained in: the kernel time at the
task's length). A loss, gradient norm, weight or held-out logit that turns NaN or Inf makes the
case a `nan` row naming the step. Every row's `observed` holds the setting (task options,
corpus, recipe) and `trained_in` (the dtype the variant computed in). The learning curve of each
case is written to `curves/<variant>_<task>_N<len>_seed<seed>.csv` in the run directory.

The lengths, batch, heads, causality and mode of a case come from the preset's task settings,
so a run of the task suite refuses the flags that set them for the other suites, and a `--dtype`
the device cannot train in (the CPU trains in fp32 only; CUDA in fp32, or bf16 through
autocast; fp16 would need loss scaling).
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from harness.config import DTYPES, BenchConfig, flag
from harness.failures import Failure
from harness.inputs import TASK_PREFIX
from harness.memory import cpu_memory_supported, peak_extra_mib
from harness.registry import Shape
from harness.suite import CaseCost, Metric, Summary, register_suite
from harness.trial import Trial
from suites.tasks.catalog import TaskError
from suites.tasks.presets import SETTINGS, Setting, settings_for
from suites.tasks.train import Outcome, train, trainable_dtypes, training_dtype
from suites.time import run_time

INPUTS_PREFIX = TASK_PREFIX
CURVES_DIR = "curves"
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Config fields the task settings fix (the sizes of the other suites), with their flags.
FIXED_BY_SETTINGS = {"seq_lens": "--seq-lens", "batch": "--batch", "heads": "--heads",
                     "head_dim": "--head-dim", "causal": "--causal/--non-causal",
                     "modes": "--mode", "inputs": "--inputs",
                     "accuracy_rows": "--accuracy-rows"}
TAKES = ("--task, --variant, --param, --plugin, --seeds, --seed, --dtype, --device, "
         "--rep-ms, --min-samples, --cuda-graph, --preset " + " or ".join(SETTINGS))


def check_task_config(config) -> None:
    """Refuse, in one line, what a task-suite run cannot do as asked: a preset without task
    settings, a flag the settings override, a dtype the device cannot train in."""
    if config.preset not in SETTINGS:
        raise TaskError(f"the task suite runs the presets {' or '.join(SETTINGS)}, got "
                        f"--preset {config.preset}; it takes {TAKES}")
    default = BenchConfig()
    ignored = [f for name, f in FIXED_BY_SETTINGS.items()
               if getattr(config, name) != getattr(default, name)]
    if ignored:
        raise TaskError(f"the task suite takes its lengths, batch, heads, causality and mode "
                        f"from its preset's task settings; drop {', '.join(ignored)} (it takes "
                        f"{TAKES})")
    valid = [name for name, dtype in DTYPES.items() if dtype in trainable_dtypes(config.device)]
    if config.dtype not in valid:
        raise TaskError(f"{flag('dtype')} {config.dtype} cannot train on {config.device}; "
                        f"valid there: {', '.join(valid)}")


def task_settings(config) -> list[tuple[str, Shape, Setting]]:
    """(inputs name, attention shape, setting) of every task setting of the run."""
    check_task_config(config)
    out = []
    for s in settings_for(config.preset, config.tasks):
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


def curve_stem(variant: str, task: str, seq_len: int) -> str:
    """The file name of a case's learning curve up to its seed (`seed<seed>.csv` follows)."""
    return f"{variant}_{task}_N{seq_len}_".replace("/", "-")


def curve_path(run_dir: Path, trial: Trial, setting: Setting, seed: int) -> Path:
    stem = curve_stem(trial.variant.label, setting.task, setting.seq_len)
    return Path(run_dir) / CURVES_DIR / f"{stem}seed{seed}.csv"


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
    setting = next(s for s in settings_for(case.config.preset, case.config.tasks)
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
    task.prepare()  # the data, made before the measured region
    outcome = Outcome()

    def run():
        nonlocal outcome
        outcome = train(task, lambda: trial.variant.build(trial.shape), setting.recipe,
                        trial.device, trial.shape.dtype, seed, trial.progress)

    trial.observed["task"] = setting.describe()
    trained = training_dtype(trial.device, trial.shape.dtype)
    trial.observed["trained_in"] = DTYPE_NAMES[trained] + (
        "" if trained == torch.float32 else " autocast")
    memory = trial.device.type == "cuda" or cpu_memory_supported() is None
    peak = peak_extra_mib(run, trial.device) if memory else None
    if trial.run_dir is not None:
        write_curve(curve_path(trial.run_dir, trial, setting, seed), outcome)
    if outcome.diverged_at is not None:
        raise Failure("nan", f"{outcome.diverged} turned NaN/Inf at step {outcome.diverged_at}")
    metrics = dict(outcome.metrics)
    if peak is not None:
        metrics["peak_mem_mib"] = peak
    metrics["attn_fwd_bwd_ms"] = run_time(trial, "fwd_bwd")["time_ms"]
    return metrics
