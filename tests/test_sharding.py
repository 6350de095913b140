"""Sharded sweeps: torchrun (gloo-free, on the CPU) and --shard give the rows of one process;
a killed process leaves a run that --resume completes; bad sharding input is one line."""
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

import run_bench
from harness import suite as suite_registry
from harness.config import BenchConfig, ConfigError, RunOptions
from harness.results import CASE_KEY
from harness.sharding import Shard, assign, group_costs, pin_gpu
from harness.shardrun import ShardedSweep, make_sweep
from harness.suite import get_suite

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "tests" / "plugins" / "dying_rank.py"
# 3 groups (variant x causal x mode) of 3 lengths x 2 suites: 18 tiny cases.
SWEEP = ["--plugin", str(PLUGIN), "--variant", "softmax_naive,rank_killer,oom_from_32",
         "--seq-lens", "16,32,64", "--heads", "1", "--head-dim", "8", "--mode", "fwd",
         "--non-causal", "--suite", "time,accuracy", "--rep-ms", "1", "--min-samples", "2",
         "--device", "cpu", "--in-process"]


IN_PROCESS = RunOptions(isolate=False, case_timeout=0)


@pytest.fixture(autouse=True)
def keep_sigterm():
    """`--shard` makes SIGTERM a KeyboardInterrupt; give pytest its own handler back."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The sweep in one process."""
    run = tmp_path_factory.mktemp("one") / "run"
    assert run_bench.main([*SWEEP, "--out", str(run)]) == 0
    return run


def stored_config(run: Path) -> BenchConfig:
    return BenchConfig.from_dict(json.loads((run / "meta.json").read_text())["config"])


def rows(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "results.csv", dtype=str, keep_default_na=False)


def assert_same_rows(run: Path, reference: Path) -> None:
    """Same columns, same (case, metric, status) in the same order; oom reasons equal."""
    got, want = rows(run), rows(reference)
    assert list(got.columns) == list(want.columns)
    key = [*CASE_KEY, "metric", "status"]
    assert got[key].values.tolist() == want[key].values.tolist()
    oom = want.status == "oom"
    assert oom.sum() == 4 and got.reason[oom].tolist() == want.reason[oom].tolist()


def exit_code(argv: list[str]) -> int:
    """run_bench's exit code (argparse's own errors exit through SystemExit)."""
    try:
        return run_bench.main(argv)
    except SystemExit as exc:
        return exc.code


def torchrun(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                           "2", "--standalone", "run_bench.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_torchrun_sweep_has_the_rows_of_one_process(tmp_path, reference):
    run = tmp_path / "run"
    done = torchrun(*SWEEP, "--out", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_rows(run, reference)
    assert set(rows(run).run_id) == {"run"}
    meta = json.loads((run / "meta.json").read_text())
    sharding = meta["sharding"]
    assert sharding["world_size"] == 2
    assert sorted(r["rank"] for r in sharding["ranks"]) == [0, 1]
    assert all(r["host"] and r["device"] == "cpu" and "gpu" in r for r in sharding["ranks"])
    assert sharding["calibration"]["processes"] == 2 and sharding["calibration"]["spread"] >= 0
    assert not list(run.glob("shards/*/*.csv")) and not list(run.glob("shards/*/rank.json"))


def test_killed_process_leaves_a_run_that_resume_completes(tmp_path, reference):
    run = tmp_path / "run"
    died = torchrun(*SWEEP, "--out", str(run), env_extra={"ATTNBENCH_TEST_KILL": "1"})
    assert died.returncode != 0
    parts = pd.concat([pd.read_csv(p, dtype=str, keep_default_na=False)
                       for p in run.glob("shards/*/results.csv")])
    killed = parts[(parts.variant == "rank_killer") & (parts.causal == "False")]
    assert set(killed.seq_len) == {"16"}  # written before the process died at N=32
    written = len(parts.drop_duplicates(list(CASE_KEY)))
    assert written < 18
    resume = make_sweep(stored_config(run), run, IN_PROCESS, shard=None, resume=True)
    assert resume.total_cases() == 18 - written  # only the missing cases run again
    assert run_bench.main(["--resume", str(run), "--in-process"]) == 0
    assert_same_rows(run, reference)
    final = rows(run).merge(parts, on=[*CASE_KEY, "metric"], suffixes=("", "_before"))
    assert len(final) == len(parts)  # every row written before the kill is kept, not re-run
    assert (final.value == final.value_before).all()
    assert not list(run.glob("shards/*/*.csv"))


def test_shard_without_torchrun_and_a_shard_that_never_ran(tmp_path, reference, capsys):
    both, half = tmp_path / "both", tmp_path / "half"
    assert run_bench.main([*SWEEP, "--shard", "0/2", "--out", str(both)]) == 0
    assert "the last process to end completes" in capsys.readouterr().err
    shutil.copytree(both, half)
    assert run_bench.main([*SWEEP, "--shard", "1/2", "--out", str(both)]) == 0
    assert_same_rows(both, reference)
    assert run_bench.main(["--resume", str(half), "--in-process"]) == 0  # shard 1 never ran
    assert_same_rows(half, reference)


def test_resume_merges_parts_and_ignores_a_cut_line(tmp_path, reference):
    """A process killed while writing leaves half a line; the merge leaves it out."""
    run = tmp_path / "run"
    part = run / "shards" / "rank-1"
    part.mkdir(parents=True)
    shutil.copy(reference / "meta.json", run / "meta.json")
    text = (reference / "results.csv").read_text()
    (part / "results.csv").write_text(text + text.splitlines()[-1][:30])
    assert run_bench.main(["--resume", str(run), "--in-process"]) == 0
    assert_same_rows(run, reference)


def test_resume_runs_again_a_case_a_process_left_unfinished(tmp_path, reference, capsys):
    """Killed while writing a case's rows: its earlier rows are in the file, the next one is
    half a line. The case runs again whole (it does not count as finished with rows missing)."""
    run = tmp_path / "run"
    part = run / "shards" / "rank-0"
    part.mkdir(parents=True)
    shutil.copy(reference / "meta.json", run / "meta.json")
    lines = (reference / "results.csv").read_text().splitlines(keepends=True)
    cases = rows(reference)[list(CASE_KEY)].astype(str).agg("|".join, axis=1).tolist()
    # The last row of the last case with several rows: killed while writing it.
    cut = max(i for i in range(1, len(cases)) if cases[i] == cases[i - 1]) + 1  # header line
    (part / "results.csv").write_text("".join(lines[:cut]) + lines[cut][:30])
    assert run_bench.main(["--resume", str(run), "--in-process"]) == 0
    said = " ".join("".join(capsys.readouterr()).split())  # the console wraps long lines
    assert "dropped an unfinished last line and the rows of its case" in said
    assert_same_rows(run, reference)


def test_compare_warns_on_a_wide_calibration_spread(tmp_path, reference, capsys):
    new = tmp_path / "new"
    shutil.copytree(reference, new)
    meta = json.loads((new / "meta.json").read_text())
    meta["sharding"] = {"world_size": 2, "ranks": [], "calibration": {
        "case": "sdpa", "spread": 0.25, "fastest_ms": 1.0, "slowest_ms": 1.25, "processes": 2}}
    (new / "meta.json").write_text(json.dumps(meta))
    run_bench.main(["compare", str(reference), str(new), "--threshold", "10%"])
    assert "processes differ by 25.0% on the calibration case" in capsys.readouterr().err
    run_bench.main(["compare", str(reference), str(new), "--threshold", "30%"])
    assert "calibration" not in capsys.readouterr().err


def test_every_case_runs_once_and_each_group_in_one_process(tmp_path, reference):
    """All lengths of a (variant, causal, mode) in one process: its OOM skips stay exact."""
    owners, cases = {}, 0
    for index in range(2):
        sweep = ShardedSweep(stored_config(reference), tmp_path / "run", Shard(index, 2),
                             options=IN_PROCESS)
        for name, shape in sweep.problems():
            for vc in sweep.configs:
                for case, _ in sweep.cases_for(vc, shape, name):
                    owners.setdefault((case.variant, case.causal, case.mode), set()).add(index)
                    cases += 1
    assert cases == 18 and len(owners) == 3
    assert all(len(shards) == 1 for shards in owners.values())


def test_group_costs_are_the_suites_own(monkeypatch, tmp_path, reference):
    """The balance prices a case as its suite declares (`Suite.cost`), not by suite name."""
    sweep = ShardedSweep(stored_config(reference), tmp_path / "run", Shard(0, 2),
                         options=IN_PROCESS)
    before = group_costs(sweep)
    accuracy = get_suite("accuracy")
    costly = replace(accuracy, cost=lambda case: 1000.0 if case.shape.seq_len == 64 else 0.0)
    monkeypatch.setitem(suite_registry._SUITES, "accuracy", costly)
    after = group_costs(sweep)
    assert max(before.values()) < 100
    assert set(after) == set(before)
    assert all(1000 <= after[group] < 1000 + before[group] for group in before)


def test_shares_are_balanced_and_cover_every_group_once():
    costs = {"a": 5.0, "b": 4.0, "c": 3.0, "d": 3.0, "e": 1.0}
    shares = assign(costs, 2)
    assert shares == [{"a", "d"}, {"b", "c", "e"}]  # loads 8 and 8
    shares = assign({f"g{i}": float(i % 4 + 1) for i in range(11)}, 3)
    assert sorted(g for s in shares for g in s) == sorted(f"g{i}" for i in range(11))
    loads = [sum(i % 4 + 1 for i in range(11) if f"g{i}" in s) for s in shares]
    assert max(loads) - min(loads) <= 4


@pytest.mark.parametrize("args, message", [
    (["--shard", "3/2"], "I must be in 0..1"),
    (["--shard", "1of2"], "expected I/N"),
    (["--shard", "0/0"], "N must be at least 1"),
    (["--shard", "0/4"], "use at most 3 processes"),
    (["--shard", "0/2", "--no-out"], "needs --out RUN_DIR"),
])
def test_bad_sharding_is_one_line(tmp_path, capsys, args, message):
    out = [] if "--no-out" in args else ["--out", str(tmp_path / "run")]
    code = exit_code([*SWEEP, *[a for a in args if a != "--no-out"], *out])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_shard_under_torchrun_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = exit_code([*SWEEP, "--shard", "0/2", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "drop --shard under torchrun" in err
    assert len(err.strip().splitlines()) == 1


def test_torchrun_process_sees_the_gpu_of_its_local_rank():
    env = {}
    pin_gpu(Shard(1, 4, local_rank=1), env)
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6"}
    pin_gpu(Shard(5, 6, local_rank=2), env)
    assert env["CUDA_VISIBLE_DEVICES"] == "6"
    with pytest.raises(ConfigError, match="start at most 3 processes per node"):
        pin_gpu(Shard(3, 4, local_rank=3), {"CUDA_VISIBLE_DEVICES": "4,5,6"})
    pin_gpu(Shard(1, 2), env)  # --shard: the scheduler chose the GPU
    assert env["CUDA_VISIBLE_DEVICES"] == "6"
