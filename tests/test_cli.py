"""The command line: bad input is one line on stderr with exit code 2; plugins; --list."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run_bench.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, expected", [
    (["--variant", "nope"], "unknown variant 'nope'; valid: "),
    (["--suite", "speed"], "unknown suite 'speed'; valid: time, memory, accuracy"),
    (["--mode", "sideways"], "unknown mode 'sideways'; valid: fwd, bwd, fwd_bwd"),
    (["--preset", "huge"], "unknown preset 'huge'; valid: quick, fig6"),
    (["--param", "fmmformer.rank=2"], "unknown parameter fmmformer.rank; valid: bandwidth"),
    (["--param", "fmmformer.kernels=7"], "fmmformer.kernels=7 is not allowed; valid: 1, 2, 3"),
    (["--param", "window.bandwidth=wide"], "window.bandwidth expects int"),
    (["--seq-lens", "0,64"], "sequence lengths must be positive"),
    (["--seq-lens", "12x"], "expected a comma list of int"),
    (["--variant", "window", "--param", "window.bandwidth=-1", "--seq-lens", "64"],
     "window[k=-1] cannot run N=64"),
    (["--dtype", "int4"], "invalid choice: 'int4'"),
    (["--resume", "/nonexistent/run"], "cannot resume"),
    (["--plugin", "/nonexistent/p.py"], "plugin file not found"),
    (["--cuda-graph"], "--cuda-graph times CUDA-graph replays; valid only with device cuda"),
])  # fmt: skip
def test_bad_input_is_one_line_exit_2(args, expected):
    result = run_cli(*args, "--device", "cpu")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_list_shows_variants_and_suites():
    result = run_cli("--list", "--device", "cpu")
    assert result.returncode == 0
    for word in ("fmmformer", "softmax_sdpa", "window_flex", "accuracy", "fig6"):
        assert word in result.stdout


PLUGIN = '''
import torch
from harness.registry import register_variant

@register_variant("mean_pool", family="linear", params={"scale": 1.0})
def make_mean_pool(shape, scale):
    """Every query returns the mean of the value vectors it may see (a toy plugin)."""
    def attend(q, k, v):
        if shape.causal:  # query i sees values 0..i
            count = torch.arange(1, v.shape[-2] + 1, device=v.device, dtype=v.dtype)
            return scale * v.cumsum(dim=-2) / count[:, None]
        return scale * v.mean(dim=-2, keepdim=True).expand_as(v).contiguous()
    return attend
'''


def test_plugin_variant_joins_a_run_and_run_resumes(tmp_path):
    plugin = tmp_path / "my_attention.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "run"
    args = ["--plugin", str(plugin), "--variant", "mean_pool,linear", "--seq-lens", "32",
            "--heads", "2", "--head-dim", "16", "--rep-ms", "5", "--device", "cpu",
            "--param", "mean_pool.scale=0.5", "--out", str(out)]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "mean_pool[scale=0.5]" in result.stdout  # the label survives rich's markup
    df = pd.read_csv(out / "results.csv")
    assert set(df.variant) == {"mean_pool[scale=0.5]", "linear"}
    assert (df.status == "ok").all()
    resumed = run_cli("--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert len(pd.read_csv(out / "results.csv")) == len(df)
