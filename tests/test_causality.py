"""The causality check: a causal variant that reads future keys does not pass silently."""
import re
from pathlib import Path

import pytest
import torch

from harness.config import BenchConfig, RunOptions
from harness.plugins import load_plugins
from harness.registry import register_variant, unregister_variant
from harness.results import load_results
from harness.runner import Sweep
from variants import load_builtin_variants

README = Path(__file__).resolve().parent.parent / "README.md"
load_builtin_variants()


@pytest.fixture
def leaky():
    """The classic plugin mistake: full attention whatever shape.causal says."""

    @register_variant("leaky", family="softmax")
    def make_leaky(shape):
        return lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1) @ v

    @register_variant("one_key_ahead", family="window", params={"bandwidth": 4})
    def make_one_ahead(shape, bandwidth):
        """A causal band that also reads the next key: a subtler leak."""
        def attend(q, k, v):
            n = q.shape[-2]
            i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
            allowed = (j >= i - bandwidth) & (j <= i + 1)
            scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
            return torch.softmax(scores, dim=-1) @ v
        return attend

    yield
    unregister_variant("leaky")
    unregister_variant("one_key_ahead")


def accuracy_rows(tmp_path, *variants, dtype="fp32"):
    config = BenchConfig(variants=variants, seq_lens=(64,), heads=2, head_dim=16, dtype=dtype,
                         suites=("accuracy",), plugins=())
    run = Sweep(config, tmp_path / dtype, options=RunOptions(isolate=False)).run(["test"])
    return load_results(run)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_future_key_leak_is_an_error_row(tmp_path, leaky, dtype):
    df = accuracy_rows(tmp_path, "leaky", "one_key_ahead", "softmax_naive", "linear",
                       dtype=dtype)
    causal = df[df.causal & (df["mode"] == "fwd")]  # the output's case (gradients: fwd_bwd)
    for name in ("leaky", "one_key_ahead"):
        rows = causal[causal.variant == name]
        assert list(rows.status) == ["error"], name
        assert rows.reason.iloc[0].startswith("not causal: future_key_leak=")
    for name in ("softmax_naive", "linear"):  # causal variants pass, with the metric recorded
        rows = causal[causal.variant == name].set_index("metric")
        assert set(rows.status) == {"ok"} and rows.loc["future_key_leak", "value"] < 1e-2
    assert set(df[~df.causal].status) == {"ok"}  # non-causal rows are not checked
    assert "future_key_leak" not in set(df[~df.causal].metric)


def test_readme_plugin_example_is_causal(tmp_path):
    code = re.search(r"```python\n# my_attention.py\n(.*?)```", README.read_text(), re.S).group(1)
    plugin = tmp_path / "my_attention.py"
    plugin.write_text(code)
    load_plugins([plugin])
    try:
        df = accuracy_rows(tmp_path, "cosine")
    finally:
        unregister_variant("cosine")
    assert set(df.status) == {"ok"}
    assert df[df.metric == "future_key_leak"].value.max() < 1e-6
