"""Bad input anywhere on the command line: one line on stderr, exit code 2, no traceback.

The walk-through calls `run_bench.main` in this process (a traceback would be an exception
here); one case runs as a real subprocess to check the same from the outside.
"""
import json
from pathlib import Path

import pytest

import run_bench
from harness.config import BenchConfig
from tests.test_cli import run_cli

SYNTAX_ERROR = "from harness.registry import register_variant\ndef broken(:\n"
RAISES = "raise ImportError('needs a package this machine lacks')\n"


def main(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = run_bench.main([*args])
    except SystemExit as exc:  # argparse's own exits (its error() and --help)
        code = exc.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def files(tmp_path):
    """Plugins that break in each way, a file where a directory belongs, and runs to resume."""
    (tmp_path / "syntax.py").write_text(SYNTAX_ERROR)
    (tmp_path / "raises.py").write_text(RAISES)
    (tmp_path / "plugin.txt").write_text("# not python\n")
    (tmp_path / "a_file").write_text("x\n")
    for name, meta in {"corrupt": "{not json", "list": "[1, 2]",
                       "badconfig": json.dumps({"config": {"heads": [1, 2], "seq_lens": 5}}),
                       "run": json.dumps({"config": BenchConfig(heads=2, seq_lens=(32,)).as_dict()})
                       }.items():  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(meta)
    return tmp_path


BAD = [  # (arguments, a piece of the one line); {d} is the fixture's folder
    (["--out", "{d}/a_file"], "is a file; expected a directory"),
    (["--out", "{d}/run"], "already holds a run; finish it with --resume {d}/run"),
    (["--out", "{d}/x", "--resume", "{d}/run"], "not allowed with argument"),
    (["--plugin", "{d}/syntax.py"], "has a syntax error at line 2"),
    (["--plugin", "{d}/raises.py"], "raised on import: ImportError: needs a package"),
    (["--plugin", "{d}/plugin.txt"], "is not a Python file; expected a .py file"),
    (["--plugin", "{d}/absent.py"], "plugin file not found"),
    (["--resume", "{d}/corrupt"], "meta.json is not valid JSON"),
    (["--resume", "{d}/list"], "meta.json is not a JSON object"),
    (["--resume", "{d}/badconfig"], "cannot resume"),
    (["--resume", "{d}/a_file"], "not a run directory"),
    (["--resume", "{d}/run", "--heads", "4", "--seq-lens", "64"],
     "these flags would change it: --seq-lens (32 in the run), --heads (2 in the run)"),
    (["--resume", "{d}/run", "--device", "cpu", "--dtype", "bf16"], "--dtype (fp32 in the run)"),
    (["--accuracy-rows", "0"], "--accuracy-rows must be a positive integer, got 0"),
    (["--accuracy-rows", "many"], "expected an integer, got 'many'"),
    (["--rep-ms", "0"], "--rep-ms must be a positive number"),
    (["--rep-ms", "-3"], "--rep-ms must be a positive number"),
    (["--rep-ms", "nan"], "expected a finite number, got 'nan'"),
    (["--rep-ms", "inf"], "expected a finite number, got 'inf'"),
    (["--min-samples", "0"], "--min-samples must be a positive integer"),
    (["--seed", "-1"], "--seed must be an integer >= 0"),
    (["--batch", "0"], "--batch must be a positive integer"),
    (["--heads", "2.5"], "expected an integer, got '2.5'"),
    (["--head-dim", "-8"], "--head-dim must be a positive integer"),
    (["--case-timeout", "-1"], "--case-timeout must be a number of seconds >= 0"),
    (["--case-timeout", "5", "--in-process"], "--case-timeout needs the worker process"),
    (["--param", "fma.m=3"],
     "fma[m=3] cannot run N=256 causal=False: fma m must be a power of two"),
    (["--param", "fmmformer.bandwidth=-1"], "fmmformer[k=-1] cannot run N=256"),
    (["--variant", "linear", "--param", "fmmformer.bandwidth=20"],
     "--param names variant 'fmmformer', which is not in this sweep; variants: linear"),
    # already one line before: still so
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
    (["--cuda-graph"], "--cuda-graph times CUDA-graph replays; valid only with device cuda"),
]  # fmt: skip


def test_every_bad_input_is_one_line_exit_2(files, capsys):
    """Each bad input, one after another: exit 2, a single stderr line, nothing run."""
    for args, expected in BAD:
        args = [a.format(d=files) for a in args]
        code, out, err = main(capsys, *args, "--device", "cpu") if "--resume" not in args \
            else main(capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2, (args, err)
        assert len(lines) == 1 and expected.format(d=files) in lines[0], (args, err)
        assert "Traceback" not in err and out == "", args
    assert not (files / "x").exists() and not list(files.glob("**/results.csv"))


# (arguments, the whole message after the prefix) of each kind of command
COMMAND_BAD = [
    (["--seq-lens", "12x"], "argument --seq-lens: expected a comma list of int, got '12x'"),
    (["compare", "only_one"], "compare: the following arguments are required: NEW"),
    (["plot", "/nonexistent/run"], "no results file at /nonexistent/run"),
    (["quality"], "quality: the following arguments are required: RUN_DIR"),
    (["tasks"], "tasks: the following arguments are required: RUN_DIR"),
    (["lowrank", "--head", "1,1"], "lowrank: the following arguments are required: --out"),
]


def test_every_command_says_bad_input_the_same_way(capsys):
    """The sweep, the report commands, the quality and task reports and a study's command:
    one line, `run_bench.py: error:` then the subcommand's name (if any) and the message."""
    for args, expected in COMMAND_BAD:
        code, out, err = main(capsys, *args)
        assert (code, out, err) == (2, "", f"run_bench.py: error: {expected}\n"), args


def test_one_line_error_from_a_real_process(files):
    result = run_cli("--plugin", str(files / "raises.py"), "--device", "cpu")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "raised on import" in result.stderr


def test_resume_accepts_flags_equal_to_the_run(files):
    args = run_bench.build_parser().parse_args(
        ["--resume", str(files / "run"), "--heads", "2", "--seq-lens", "32", "--fail-fast"])
    config = run_bench.resumed_config(files / "run", args)
    assert config.heads == 2 and config.seq_lens == (32,)


def test_help_and_readme_name_the_report_commands(capsys):
    code, out, _ = main(capsys, "--help")
    assert code == 0
    for command in ("plot", "compare", "report", "targets", "--case-timeout", "--fail-fast",
                    "--in-process"):
        assert command in out
    readme = (Path(run_bench.__file__).parent / "README.md").read_text()
    commands = readme.split("## Command line", 1)[1].split("```", 2)[1]
    for command in ("plot", "compare", "report", "targets"):
        assert f"python run_bench.py {command} " in commands, command
