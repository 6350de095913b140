"""The command line: plugins, resume, --list (bad input: tests/test_errors.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.config import ConfigError

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run_bench.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_list_shows_full_names_at_80_columns():
    """Every variant name whole, even on an 80-column terminal."""
    from io import StringIO

    from rich.console import Console

    import run_bench
    from harness.registry import all_variants
    from variants import load_builtin_variants

    load_builtin_variants()
    buffer = StringIO()
    run_bench.print_listing(Console(file=buffer, width=80), "cpu")
    text = buffer.getvalue()
    cells = {cell.strip() for line in text.splitlines() for cell in line.split("│")}
    for spec in all_variants():
        assert spec.name in cells, spec.name
    for word in ("accuracy", "fig6"):
        assert word in text


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
    args = ["--plugin", "my_attention.py", "--variant", "mean_pool,linear", "--seq-lens", "32",
            "--heads", "2", "--head-dim", "16", "--rep-ms", "5", "--min-samples", "3",
            "--device", "cpu",
            "--param", "mean_pool.scale=0.5", "--out", str(out)]
    result = run_cli(*args, cwd=tmp_path)  # the plugin path is relative to tmp_path
    assert result.returncode == 0, result.stderr
    assert "mean_pool[scale=0.5]" in result.stdout  # the label survives rich's markup
    df = pd.read_csv(out / "results.csv")
    assert set(df.variant) == {"mean_pool[scale=0.5]", "linear"}
    assert (df.status == "ok").all()
    assert b"\r" not in (out / "results.csv").read_bytes()  # LF line endings
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["plugins"] == [str(plugin)]  # stored absolute
    # Drop the last case (as a crash would) and resume from another folder: the plugin loads.
    lines = (out / "results.csv").read_text().splitlines(keepends=True)
    key = ["variant", "suite", "mode", "causal"]
    in_last_case = (df[key] == df[key].iloc[-1]).all(axis=1)
    (out / "results.csv").write_text("".join(lines[: 1 + int((~in_last_case).sum())]))
    resumed = run_cli("--resume", str(out), "--in-process")  # execution options may change
    assert resumed.returncode == 0, resumed.stderr
    again = pd.read_csv(out / "results.csv")
    assert len(again) == len(df) and again.drop(columns="value").equals(df.drop(columns="value"))


def tiny_capture(path: Path, seed: int) -> None:
    """A q, k, v file of 1 layer, 1 head, N=16, D=8 (random: only its identity matters)."""
    import torch

    from harness.capture import QKV, save_qkv

    gen = torch.Generator().manual_seed(seed)
    save_qkv(QKV(*(torch.randn(1, 1, 16, 8, generator=gen) for _ in range(3)), causal=False),
             path)


def test_file_inputs_are_stored_absolute_and_a_changed_file_refuses_resume(tmp_path, monkeypatch,
                                                                          capsys):
    import run_bench

    tiny_capture(tmp_path / "qkv.safetensors", seed=0)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert run_bench.main(["--inputs", "file:qkv.safetensors", "--variant", "softmax_naive",
                           "--suite", "accuracy", "--mode", "fwd", "--non-causal", "--device",
                           "cpu", "--in-process", "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    spec = f"file:{tmp_path / 'qkv.safetensors'}"
    assert meta["config"]["inputs"] == [spec]
    assert set(pd.read_csv(out / "results.csv").inputs) == {spec}
    assert meta["input_files"][spec]["size"] == (tmp_path / "qkv.safetensors").stat().st_size
    capsys.readouterr()
    tiny_capture(tmp_path / "qkv.safetensors", seed=1)  # same size, other values
    monkeypatch.chdir(REPO)
    assert run_bench.main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the file changed since the run started" in err


def test_a_repeated_comma_list_value_counts_once():
    import run_bench
    from harness.registry import parse_param_overrides
    from variants import load_builtin_variants

    load_builtin_variants()
    args = run_bench.build_parser().parse_args(
        ["--variant", "linear,window,linear", "--seq-lens", "64,32,64", "--suite", "time,time",
         "--mode", "fwd,fwd"])
    assert (args.variant, args.seq_lens, args.suite, args.mode) == (
        ("linear", "window"), (64, 32), ("time",), ("fwd",))
    assert parse_param_overrides(["window.bandwidth=20,10,20"]) == {"window": {"bandwidth": [20, 10]}}


SUITE_PLUGIN = '''
from harness.suite import Metric, register_suite


@register_suite("resume_probe", modes=("fwd",), primary="probe", default=False,
                metrics=(Metric("probe", "units"),))
def run_probe(trial, mode):
    """A constant (only its registration matters)."""
    return {"probe": 1.0}
'''


def test_resume_loads_the_runs_plugins_before_checking_its_suites(tmp_path):
    import run_bench
    from harness.config import BenchConfig
    from harness.suite import unregister_suite

    plugin = tmp_path / "probe_suite.py"
    plugin.write_text(SUITE_PLUGIN)
    config = BenchConfig(suites=("resume_probe",), plugins=(str(plugin),), device="cpu")
    (tmp_path / "meta.json").write_text(json.dumps({"config": config.as_dict()}))
    args = run_bench.build_parser().parse_args(["--resume", str(tmp_path)])
    try:
        assert run_bench.resumed_config(tmp_path, args) == config
    finally:
        unregister_suite("resume_probe")


def test_an_out_that_cannot_be_made_is_one_line_exit_2(tmp_path, capsys):
    import os

    import run_bench
    from harness.config import BenchConfig
    from harness.runner import Sweep

    (tmp_path / "file").write_text("")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    outs = [tmp_path / "file" / "run"] + ([locked / "run"] if os.geteuid() != 0 else [])
    for out in outs:
        assert run_bench.main(["--variant", "softmax_naive", "--device", "cpu", "--out",
                               str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot create --out {out}" in err
    with pytest.raises(ConfigError, match="cannot create the run directory"):
        Sweep(BenchConfig(variants=("softmax_naive",), device="cpu"), outs[0]).run(["test"])


def test_a_param_given_twice_is_refused():
    from harness.registry import RegistryError, parse_param_overrides
    from variants import load_builtin_variants

    load_builtin_variants()
    with pytest.raises(RegistryError, match=r"^--param window.bandwidth is given twice; sweep "
                       r"several values with one comma list: --param window.bandwidth=A,B$"):
        parse_param_overrides(["window.bandwidth=20", "window.bandwidth=10"])


def test_a_plugin_that_exits_on_import_is_a_one_line_error(tmp_path):
    from harness.plugins import load_plugins

    plugin = tmp_path / "exits.py"
    plugin.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(ConfigError, match=rf"^plugin {plugin} called sys.exit\(3\) on import$"):
        load_plugins([plugin])


def test_list_on_cuda_without_cuda_says_so(monkeypatch):
    from io import StringIO

    import torch
    from rich.console import Console

    import run_bench
    from variants import load_builtin_variants

    load_builtin_variants()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    buffer = StringIO()
    run_bench.print_listing(Console(file=buffer, width=400), "cuda")
    rows = [line for line in buffer.getvalue().splitlines() if "softmax_flex" in line]
    assert rows and "CUDA is not available on this machine" in rows[0] and "yes" not in rows[0]


def test_an_unknown_command_lists_every_command(capsys):
    import run_bench

    assert run_bench.main(["nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    for name in ("plot", "report", "compare", "tasks", "capture", "dropin", "quality"):
        assert f"'{name}'" in err
