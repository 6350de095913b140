"""The variant registry: a decorator that records how to build, check and count a variant.

A variant is registered by decorating its *factory*::

    @register_variant("linear", family="linear", params={"eps": 1e-6}, flops=..., min_bytes=...)
    def make_linear(shape: Shape, eps: float):
        return lambda q, k, v: linear_attention(q, k, v, causal=shape.causal, eps=eps)

The factory receives the problem `Shape` and the variant's parameters and returns a callable
(or an `nn.Module`, whose parameters then take part in backward timing) mapping
`q, k, v` of shape `[B, H, N, D]` to `o` of the same shape.
"""
from __future__ import annotations

import importlib.util
import inspect
import itertools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

# Families in their listing order; `register_family` adds one (e.g. from a `--plugin` file).
_FAMILIES: list[str] = ["softmax", "window", "linear", "fmm", "multipole"]
# The registered variant whose math is exact softmax attention: the accuracy suite's truth for
# `rel_err_vs_softmax`. It declares `rows_reference`.
EXACT = "softmax_naive"


class RegistryError(ValueError):
    """Bad registration or bad user input about variants; the message is one readable line."""


@dataclass(frozen=True)
class Shape:
    """One attention problem: `[batch, heads, seq_len, head_dim]`, causal or not."""

    batch: int
    heads: int
    seq_len: int
    head_dim: int
    causal: bool = False
    dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        """Elements of one of q, k, v or o."""
        return self.batch * self.heads * self.seq_len * self.head_dim

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def qkvo_bytes(shape: Shape) -> float:
    """Fewest bytes any attention moves: q, k, v read once and o written once."""
    return 4.0 * shape.numel * shape.element_size


Counter = Callable[[Shape, dict[str, Any]], float]
# (device) or (device, params) -> why the variant cannot run there, or None.
Availability = Callable[..., str | None]
# (q, k, v, rows, causal) -> the output at query rows `rows` only, `[B, H, len(rows), D]`.
RowsReference = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool],
                         torch.Tensor]


@dataclass(frozen=True)
class VariantSpec:
    """Everything the harness knows about one registered variant."""

    name: str
    family: str
    factory: Callable[..., Callable]
    params: dict[str, Any] = field(default_factory=dict)
    short: dict[str, str] = field(default_factory=dict)
    choices: dict[str, tuple] = field(default_factory=dict)
    causal: tuple[bool, ...] = (False, True)
    devices: tuple[str, ...] = ("cpu", "cuda")
    requires: tuple[str, ...] = ()
    available: Availability | None = None
    check: Callable[[Shape, dict[str, Any]], str | None] | None = None
    reference: str | None = None
    rows_reference: RowsReference | None = None
    flops: Counter | None = None
    min_bytes: Counter = lambda shape, params: qkvo_bytes(shape)
    description: str = ""

    def unavailable_reason(self, device: torch.device,
                           params: dict[str, Any] | None = None) -> str | None:
        """Why this variant, with `params` (default: its defaults), cannot run on `device`
        (None when it can)."""
        if device.type not in self.devices:
            return f"{self.name} runs on {'/'.join(self.devices)}, not {device.type}"
        for package in self.requires:
            if importlib.util.find_spec(package) is None:
                return f"package '{package}' is not installed"
        if self.available is None:
            return None
        if len(inspect.signature(self.available).parameters) == 1:
            return self.available(device)
        return self.available(device, {**self.params, **(params or {})})

    def unsupported_reason(self, shape: Shape, params: dict[str, Any]) -> str | None:
        """Why this variant cannot take `shape` with `params` (None when it can)."""
        if shape.causal not in self.causal:
            return f"{self.name} has no {'causal' if shape.causal else 'non-causal'} form"
        return self.check(shape, params) if self.check else None

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        """Merge `params` over the defaults, rejecting unknown names and bad choices."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            valid = ", ".join(sorted(self.params)) or "none"
            raise RegistryError(f"unknown parameter {self.name}.{unknown[0]}; valid: {valid}")
        merged = {**self.params, **params}
        for key, allowed in self.choices.items():
            if merged[key] not in allowed:
                raise RegistryError(
                    f"{self.name}.{key}={merged[key]!r} is not allowed; valid: "
                    + ", ".join(map(str, allowed))
                )
        return merged

    def label(self, params: dict[str, Any]) -> str:
        """Readable row label: the name, plus the parameters that differ from the defaults."""
        changed = [
            f"{self.short.get(k, k)}={_fmt(v)}" for k, v in params.items() if self.params.get(k) != v
        ]
        return f"{self.name}[{','.join(changed)}]" if changed else self.name


@dataclass(frozen=True)
class VariantConfig:
    """A variant with concrete parameters: the unit the runner sweeps over."""

    spec: VariantSpec
    params: dict[str, Any]

    @property
    def label(self) -> str:
        return self.spec.label(self.params)

    def build(self, shape: Shape) -> Callable:
        """Call the factory: returns the callable (or module) mapping q, k, v to o."""
        return self.spec.factory(shape, **self.params)


_REGISTRY: dict[str, VariantSpec] = {}


def register_variant(name: str, *, family: str, **options: Any) -> Callable:
    """Decorator registering a variant factory under an explicit `name`.

    Args:
        name: unique variant name, used on the command line and in results.
        family: one of `families()`.
        **options: any `VariantSpec` field: `params` (defaults), `short` (label names),
            `choices`, `causal` (supported flags), `devices`, `requires` (packages),
            `available` (device, or device and params -> reason or None), `check` (shape, params -> reason or None),
            `reference` (variant whose float64 form is this one's truth; default itself, and
            `EXACT` for the softmax family),
            `rows_reference` (its math at a subset of query rows, which accuracy references
            use at long lengths instead of the factory),
            `flops` and `min_bytes` (shape, params -> count), `description`.
    """
    if family not in _FAMILIES:
        raise RegistryError(f"unknown family '{family}'; valid: {', '.join(_FAMILIES)} "
                            "(register_family adds one)")

    if family == "softmax" and name != EXACT:
        options.setdefault("reference", EXACT)

    def decorator(factory: Callable) -> Callable:
        if name in _REGISTRY:
            raise RegistryError(f"variant '{name}' is already registered")
        doc = (factory.__doc__ or "").strip().splitlines()
        options.setdefault("description", doc[0] if doc else "")
        _REGISTRY[name] = VariantSpec(name=name, family=family, factory=factory, **options)
        return factory

    return decorator


def register_family(name: str) -> None:
    """Add a family of variants (listed after those already known); known names are kept."""
    if not name or not isinstance(name, str):
        raise RegistryError(f"a family name must be a non-empty string, got {name!r}")
    if name not in _FAMILIES:
        _FAMILIES.append(name)


def families() -> tuple[str, ...]:
    """Every family, in listing order."""
    return tuple(_FAMILIES)


def family_rank(family: str) -> int:
    """A family's place in listings (unknown families, e.g. from a plugin not loaded, last)."""
    return _FAMILIES.index(family) if family in _FAMILIES else len(_FAMILIES)


def unregister_variant(name: str) -> None:
    """Remove a variant (tests and plugins that re-register use this)."""
    _REGISTRY.pop(name, None)


def get_variant(name: str) -> VariantSpec:
    """Look a variant up by name; unknown names raise a one-line error listing the valid ones."""
    if name not in _REGISTRY:
        raise RegistryError(f"unknown variant '{name}'; valid: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def all_variants() -> list[VariantSpec]:
    """Every registered variant, sorted by family then name."""
    return sorted(_REGISTRY.values(), key=lambda s: (family_rank(s.family), s.name))


def parse_param_overrides(items: Iterable[str]) -> dict[str, dict[str, list[Any]]]:
    """Parse `variant.param=value[,value...]` strings into {variant: {param: [values]}}.

    Values are converted to the type of the parameter's default, so `bandwidth=20` is an int.
    A comma list sweeps the parameter: each value becomes its own labelled row (a repeated
    value counts once); the same parameter given twice is a `RegistryError`.
    """
    overrides: dict[str, dict[str, list[Any]]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        variant, dot, param = key.partition(".")
        if not (sep and dot and variant and param and raw):
            raise RegistryError(f"bad --param '{item}'; expected VARIANT.PARAM=VALUE[,VALUE...]")
        spec = get_variant(variant)
        if param not in spec.params:
            valid = ", ".join(sorted(spec.params)) or "none"
            raise RegistryError(f"unknown parameter {variant}.{param}; valid: {valid}")
        if param in overrides.get(variant, {}):
            raise RegistryError(f"--param {variant}.{param} is given twice; sweep several "
                                f"values with one comma list: --param {variant}.{param}=A,B")
        default = spec.params[param]
        values = [_coerce(v.strip(), default, f"{variant}.{param}") for v in raw.split(",")]
        values = list(dict.fromkeys(values))
        overrides.setdefault(variant, {})[param] = values
    return overrides


def expand_configs(
    names: Iterable[str], overrides: dict[str, dict[str, list[Any]]] | None = None
) -> list[VariantConfig]:
    """One `VariantConfig` per variant and per combination of swept parameter values."""
    overrides = overrides or {}
    configs = []
    for name in names:
        spec = get_variant(name)
        swept = overrides.get(name, {})
        keys = list(swept)
        for combo in itertools.product(*(swept[k] for k in keys)):
            configs.append(VariantConfig(spec, spec.validate(dict(zip(keys, combo)))))
    return configs


def triton_devices() -> tuple[str, ...]:
    """Devices a Triton kernel can run on: CUDA, plus the CPU under TRITON_INTERPRET=1."""
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


def _coerce(raw: str, default: Any, where: str) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise RegistryError(
            f"{where} expects {type(default).__name__}, got '{raw}'"
        ) from None
    return raw


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
