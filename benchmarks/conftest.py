"""pytest-benchmark over the variant registry: the `--attn-*` options that choose the cases of
`benchmarks/test_speed.py`, their markers, and the GPU and software versions in the machine
info that `--benchmark-compare` checks."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from harness.config import BenchConfig, ConfigError, default_device, preset_config, with_overrides
from harness.environment import fingerprint
from harness.executor import CaseRunner
from harness.plugins import load_plugins, plugin_path
from harness.registry import RegistryError, Shape, VariantConfig, families
from harness.roofline import measure_roofline
from harness.runner import check_explicit_lengths, check_params, resolve_configs, sweep_problems
from suites import load_builtin_suites
from variants import load_builtin_variants

MACHINE_KEYS = ("gpu", "driver", "cuda", "torch", "triton")
MARKERS = {
    "fwd": "forward (inference) cases", "bwd": "backward-alone cases",
    "fwd_bwd": "forward plus backward cases",
    "causal": "causal cases", "noncausal": "non-causal cases",
}  # fmt: skip


@dataclass(frozen=True)
class SpeedCase:
    """One benchmark: a variant configuration at one shape and mode."""

    variant: VariantConfig
    shape: Shape
    mode: str
    inputs: str = "randn"

    @property
    def id(self) -> str:
        form = "causal" if self.shape.causal else "full"
        return f"{self.variant.label}-N{self.shape.seq_len}-{self.mode}-{form}"


def pytest_addoption(parser):
    group = parser.getgroup("attnbench", "attnbench speed cases (benchmarks/test_speed.py)")
    add = group.addoption
    add("--attn-variants", default="", help="comma list of variants (default: every registered)")
    add("--attn-lengths", default="", help="comma list of sequence lengths (default: the quick "
                                           "preset's: CPU 256,1024; CUDA 1024,4096,16384)")
    add("--attn-modes", default="fwd,fwd_bwd", help="comma list of fwd, bwd, fwd_bwd")
    add("--attn-causal", default="false,true", help="comma list of false, true")
    add("--attn-device", default=None, help="cpu or cuda (default: cuda when present)")
    add("--attn-dtype", default=None, help="fp32, bf16, fp16 or fp64 (default: the preset's)")
    add("--attn-batch", default=None, help="batch size (default 1)")
    add("--attn-heads", default=None, help="heads (default: the preset's)")
    add("--attn-head-dim", default=None, help="head dimension (default 64)")
    add("--attn-param", action="append", default=[], metavar="VARIANT.PARAM=VALUE[,VALUE...]",
        help="a variant parameter (a comma list sweeps it), as run_bench.py --param")
    add("--attn-plugin", action="append", default=[], metavar="FILE.py",
        help="a file whose @register_variant variants join the cases")


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    if not config.option.help:
        bench_config(config)  # bad --attn-* input stops pytest here, with one line
        for family in families():  # the built-in and plugins' families
            config.addinivalue_line("markers", f"{family}: {family}-family variants")


def _split(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _integer(option: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{option} expects an integer, got '{text}'") from None


def _causal(text: str) -> tuple[bool, ...]:
    flags = {"false": False, "true": True}
    for item in _split(text):
        if item.lower() not in flags:
            raise ConfigError(f"--attn-causal: '{item}' is not a choice; valid: false, true")
    return tuple(flags[item.lower()] for item in _split(text))


def bench_config(config) -> BenchConfig:
    """The cases' configuration from the `--attn-*` options (built once per session); bad
    input ends the session with one line naming the valid choices, exit 2."""
    if getattr(config, "_attn_config", None) is None:
        opt = config.getoption
        try:
            load_builtin_suites()
            load_builtin_variants()
            load_plugins(opt("attn_plugin"))
            device = opt("attn_device") or default_device()
            if device not in ("cpu", "cuda"):
                raise ConfigError(f"--attn-device: unknown device '{device}'; valid: cpu, cuda")
            lengths = _split(opt("attn_lengths"))
            bench = with_overrides(
                preset_config("quick", device), suites=("time",),
                variants=_split(opt("attn_variants")) or None,
                seq_lens=tuple(_integer("--attn-lengths", n) for n in lengths) or None,
                modes=_split(opt("attn_modes")), causal=_causal(opt("attn_causal")),
                dtype=opt("attn_dtype"), batch=_integer("--attn-batch", opt("attn_batch")),
                heads=_integer("--attn-heads", opt("attn_heads")),
                head_dim=_integer("--attn-head-dim", opt("attn_head_dim")),
                params=tuple(opt("attn_param")),
                plugins=tuple(plugin_path(p) for p in opt("attn_plugin")),
            )  # fmt: skip
            check_explicit_lengths(bench, resolve_configs(bench))
            check_params(bench, resolve_configs(bench))
        except (ConfigError, RegistryError) as exc:
            pytest.exit(f"error: {exc}", returncode=2)
        config._attn_config = bench
    return config._attn_config


def speed_cases(bench: BenchConfig) -> list[SpeedCase]:
    """Every (variant configuration, shape, mode) of the configuration."""
    configs = resolve_configs(bench)
    return [SpeedCase(vc, shape, mode, inputs)
            for inputs, shape in sweep_problems(bench) for vc in configs for mode in bench.modes]


def case_marks(case: SpeedCase) -> list:
    """Markers that select a case with `-m`: its family, its mode, causal or noncausal."""
    form = "causal" if case.shape.causal else "noncausal"
    return [getattr(pytest.mark, case.variant.spec.family), getattr(pytest.mark, case.mode),
            getattr(pytest.mark, form)]


@pytest.fixture(scope="session")
def attn_runner(request):
    """Builds each case's variant and inputs (inputs shared by the variants of one shape);
    on CUDA with the device's roofline measured once."""
    bench = bench_config(request.config)
    device = torch.device(bench.device)
    roofline = measure_roofline(device) if device.type == "cuda" else None
    runner = CaseRunner(bench, roofline)
    yield runner
    runner.close()


def pytest_benchmark_update_machine_info(config, machine_info):
    """GPU (or None on a CPU), driver, CUDA, torch and triton versions beside pytest-benchmark's
    CPU and Python fields."""
    info = fingerprint(torch.device(bench_config(config).device))
    machine_info.update({key: info[key] for key in MACHINE_KEYS})
