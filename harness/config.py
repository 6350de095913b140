"""Run configuration: one frozen dataclass plus named presets, and the
options of how a sweep is executed (which do not change what it measures)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from harness.errors import ConfigError
from harness.inputs import sources
from harness.suite import MODES, SuiteError, default_suites, get_suite

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
PRESETS = ("quick", "fig6", "tasks", "tasks-smoke")


@dataclass(frozen=True)
class BenchConfig:
    """Everything that defines a sweep. `variants` empty means every registered variant;
    `suites` empty means every suite registered as a default one (`run_suites`)."""

    preset: str = "quick"
    variants: tuple[str, ...] = ()
    suites: tuple[str, ...] = ()
    modes: tuple[str, ...] = ("fwd", "fwd_bwd")
    seq_lens: tuple[int, ...] = (256, 1024)
    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    dtype: str = "fp32"
    causal: tuple[bool, ...] = (False, True)
    device: str = "cpu"
    params: tuple[str, ...] = ()  # raw `variant.param=value` overrides
    plugins: tuple[str, ...] = ()
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_samples: int = 10  # timed samples per case, however long one call takes
    accuracy_rows: int = 1024  # query rows sampled for float64 references above this N
    seed: int = 0
    cuda_graph: bool = False  # time CUDA-graph replays: the GPU without the Python launch path
    inputs: tuple[str, ...] = ("randn",)  # q, k, v sources: randn, minilm, smollm2, file:PATH
    tasks: tuple[str, ...] = ("mqar", "listops", "charlm")  # trained tasks (`task` suite)
    seeds: int = 1  # training seeds per task case: seed, seed + 1, ...

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchConfig:
        """Rebuild a config saved in meta.json (lists become tuples; keys that older
        versions wrote and this one no longer has are ignored)."""
        if not isinstance(data, dict):
            raise ConfigError("the stored config is not a JSON object")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ConfigError(f"the stored config is unreadable: {exc}") from None


@dataclass(frozen=True)
class RunOptions:
    """How a sweep is executed; none of these change what a case measures.

    isolate: run cases in a worker process, so that a crash or hang costs one case.
    case_timeout: seconds a case (or building the variant) may take in the worker; 0: no limit.
    fail_fast: stop at the first row whose status is not ok.
    """

    isolate: bool = True
    case_timeout: float = 300.0
    fail_fast: bool = False


def default_device() -> str:
    """CUDA when present, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def preset_config(name: str, device: str) -> BenchConfig:
    """The named preset for `device`.

    quick: small lengths that finish in minutes (CPU: fp32, 4 heads; CUDA: bf16, 16 heads).
    fig6: the FMMformer paper's scaling figure: bf16, B=1, H=16, D=64, N=2^10..2^16,
        fwd and fwd_bwd, causal and non-causal, time, memory and accuracy.
    tasks: the trained tasks (`task` suite) at full size, 3 seeds, bf16 autocast (GPU).
    tasks-smoke: the trained tasks shrunk for a CPU (fp32, 1 seed).
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; valid: {', '.join(PRESETS)}")
    if name == "tasks":
        return BenchConfig(preset=name, device=device, suites=("task",), seeds=3,
                           dtype="bf16" if device == "cuda" else "fp32")
    if name == "tasks-smoke":
        return BenchConfig(preset=name, device=device, suites=("task",))
    suites = default_suites()  # recorded in meta.json as they were at the run's start
    if name == "fig6":
        return BenchConfig(
            preset="fig6", device=device, dtype="bf16", heads=16, head_dim=64,
            seq_lens=tuple(2**p for p in range(10, 17)), rep_ms=200.0, suites=suites,
        )  # fmt: skip
    if device == "cuda":
        return BenchConfig(device=device, dtype="bf16", heads=16, seq_lens=(1024, 4096, 16384),
                           suites=suites)
    return BenchConfig(device=device, suites=suites)


def run_suites(config: BenchConfig) -> tuple[str, ...]:
    """The suites a sweep of `config` measures: those named, else the default ones."""
    return config.suites or default_suites()


def with_overrides(config: BenchConfig, **overrides: Any) -> BenchConfig:
    """`config` with every override that is not None applied, then validated."""
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    validate(config)
    return config


def validate(config: BenchConfig) -> None:
    """Reject configurations that cannot run, with one-line messages naming valid choices."""
    for name in ("variants", "suites", "modes", "seq_lens", "causal", "params", "plugins",
                 "tasks"):
        if not isinstance(getattr(config, name), tuple):
            raise ConfigError(f"{name} must be a list, got {getattr(config, name)!r}")
    for suite in config.suites:
        try:
            get_suite(suite)
        except SuiteError as exc:
            raise ConfigError(str(exc)) from None
    for mode in config.modes:
        if mode not in MODES:
            raise ConfigError(f"unknown mode '{mode}'; valid: {', '.join(MODES)}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"unknown dtype '{config.dtype}'; valid: {', '.join(DTYPES)}")
    if config.device not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device '{config.device}'; valid: cpu, cuda")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available; valid: cpu")
    if config.cuda_graph and config.device != "cuda":
        raise ConfigError("--cuda-graph times CUDA-graph replays; valid only with device cuda")
    own = [s for s in config.suites if get_suite(s).problems is not None]
    if own and len(config.suites) > 1:
        raise ConfigError(f"the {own[0]} suite runs alone (it brings its own problems); run "
                          f"--suite {own[0]} separately")
    for name in own:
        get_suite(name).problems(config)  # its sizes and names, before anything runs
    for name in ("batch", "heads", "head_dim", "accuracy_rows", "min_samples", "seeds"):
        value = getattr(config, name)
        if not _is_int(value) or value < 1:
            raise ConfigError(f"{flag(name)} must be a positive integer, got {value!r}")
    if not _is_int(config.seed) or config.seed < 0:
        raise ConfigError(f"--seed must be an integer >= 0, got {config.seed!r}")
    for name in ("rep_ms", "warmup_ms"):
        value = getattr(config, name)
        if not _is_number(value) or not (0 < value < math.inf):
            raise ConfigError(f"{flag(name)} must be a positive number of milliseconds, "
                              f"got {value!r}")
    if not config.seq_lens or any(not _is_int(n) or n < 1 for n in config.seq_lens):
        raise ConfigError(f"sequence lengths must be positive integers, got {list(config.seq_lens)}")
    sources(config)  # unknown names, unreadable files, lengths a source does not hold


def validate_options(options: RunOptions) -> None:
    """Reject execution options that cannot work (one-line ConfigError)."""
    t = options.case_timeout
    if not _is_number(t) or not (0 <= t < math.inf):
        raise ConfigError(f"--case-timeout must be a number of seconds >= 0 (0: no limit), "
                          f"got {t!r}")


def flag(field_name: str) -> str:
    """The command-line flag of a config field: `head_dim` -> `--head-dim`."""
    return "--" + field_name.replace("_", "-")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
