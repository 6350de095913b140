"""Registry behaviour: registration, labels, parameter parsing and clear errors."""
import pytest

from harness.registry import (
    RegistryError, Shape, expand_configs, get_variant, parse_param_overrides, register_variant,
    unregister_variant,
)  # fmt: skip
from variants import load_builtin_variants

load_builtin_variants()


@pytest.fixture
def toy():
    @register_variant("toy_variant", family="linear", params={"width": 4, "mode": "a"},
                      short={"width": "w"}, choices={"mode": ("a", "b")}, causal=(False,))
    def make_toy(shape, width, mode):
        """A toy variant."""
        return lambda q, k, v: v

    yield get_variant("toy_variant")
    unregister_variant("toy_variant")


def test_builtin_variants_registered():
    for name in ("softmax_naive", "softmax_sdpa", "softmax_flex", "window_flex", "window",
                 "linear", "fmmformer"):
        assert get_variant(name).name == name


def test_duplicate_name_rejected(toy):
    with pytest.raises(RegistryError, match="already registered"):
        register_variant("toy_variant", family="linear")(lambda shape: None)


def test_unknown_family_and_variant():
    with pytest.raises(RegistryError, match="valid: softmax"):
        register_variant("x", family="quantum")
    with pytest.raises(RegistryError, match="unknown variant 'nope'; valid: .*fmmformer"):
        get_variant("nope")


def test_labels_show_changed_params(toy):
    assert toy.description == "A toy variant."
    assert toy.label(toy.validate({})) == "toy_variant"
    assert toy.label(toy.validate({"width": 8})) == "toy_variant[w=8]"
    fmm = get_variant("fmmformer")
    assert fmm.label(fmm.validate({"bandwidth": 20, "kernels": 2})) == "fmmformer[k=20,r=2]"


def test_param_parsing_types_and_sweeps(toy):
    overrides = parse_param_overrides(["toy_variant.width=2,8", "toy_variant.mode=b"])
    assert overrides == {"toy_variant": {"width": [2, 8], "mode": ["b"]}}
    labels = [c.label for c in expand_configs(["toy_variant"], overrides)]
    assert labels == ["toy_variant[w=2,mode=b]", "toy_variant[w=8,mode=b]"]


@pytest.mark.parametrize("item, message", [
    ("toy_variant.width=x", "expects int"),
    ("toy_variant.depth=3", "unknown parameter toy_variant.depth; valid: mode, width"),
    ("nope.width=3", "unknown variant 'nope'"),
    ("toy_variant=3", "expected VARIANT.PARAM=VALUE"),
])  # fmt: skip
def test_bad_params(toy, item, message):
    with pytest.raises(RegistryError, match=message):
        parse_param_overrides([item])


def test_bad_choice(toy):
    with pytest.raises(RegistryError, match="valid: a, b"):
        expand_configs(["toy_variant"], parse_param_overrides(["toy_variant.mode=c"]))


def test_support_checks(toy):
    import torch

    assert toy.unsupported_reason(Shape(1, 1, 8, 8, causal=True), {}) is not None
    assert get_variant("softmax_flex").unavailable_reason(torch.device("cpu")) is not None
    window = get_variant("window")
    assert "bandwidth" in window.unsupported_reason(Shape(1, 1, 8, 8), {"bandwidth": -1})


def test_availability_may_depend_on_parameters():
    """`available` takes the device, or the device and the parameters: softmax_sdpa's CUDA-only
    backends are unavailable on a CPU, its others are not."""
    import torch

    sdpa, cpu = get_variant("softmax_sdpa"), torch.device("cpu")
    for backend in ("cudnn", "efficient"):
        reason = sdpa.unavailable_reason(cpu, {"backend": backend})
        assert reason == f"softmax_sdpa backend '{backend}' runs on cuda, not cpu"
    for backend in ("auto", "flash", "math"):
        assert sdpa.unavailable_reason(cpu, {"backend": backend}) is None
    assert sdpa.unavailable_reason(cpu) is None  # the defaults


def test_sweep_skips_a_backend_the_device_lacks(tmp_path):
    """On a CPU, `--param softmax_sdpa.backend=cudnn,math` runs math and records cudnn as
    `skipped` with the reason (no error rows from inside PyTorch)."""
    from harness.config import BenchConfig, RunOptions
    from harness.results import load_results
    from harness.runner import Sweep

    config = BenchConfig(device="cpu", variants=("softmax_sdpa",), suites=("accuracy",),
                         modes=("fwd",), seq_lens=(16,), heads=1, head_dim=16,
                         params=("softmax_sdpa.backend=cudnn,math",))
    options = RunOptions(isolate=False, case_timeout=0)
    df = load_results(Sweep(config, tmp_path / "run", options=options).run(["test"]))
    status = df.groupby("variant")["status"].agg(set)
    assert status["softmax_sdpa[backend=cudnn]"] == {"skipped"}
    assert status["softmax_sdpa[backend=math]"] == {"ok"}
    reasons = set(df[df.variant == "softmax_sdpa[backend=cudnn]"].reason)
    assert reasons == {"softmax_sdpa backend 'cudnn' runs on cuda, not cpu"}


def test_every_builtin_module_imports():
    from variants import BROKEN_MODULES

    assert BROKEN_MODULES == {}
