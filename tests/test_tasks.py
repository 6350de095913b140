"""Trained tasks: the generators against their definitions, no train/test leakage, a short
training run that learns MQAR through the whole command line, divergence, reports, bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import run_bench
from harness.registry import unregister_variant
from harness.results import COLUMNS, RESULTS_FILE
from harness.reports.tasks import quality_table, task_rows, write_report
from studies import load_studies
from studies.fmmformer.task_claims import claim_check
from suites.tasks import charlm, listops, mqar
from suites.tasks.catalog import make_task
from suites.tasks.train import Recipe, train

ROOT = Path(__file__).resolve().parent.parent


def test_mqar_answers_sit_where_the_definition_puts_them():
    spec = mqar.MQARSpec(seq_len=50, pairs=5, vocab=40)
    x, y = mqar.mqar_batch(spec, 300, torch.Generator().manual_seed(7))
    half, context, gaps = 20, 10, []
    for row, target in zip(x.tolist(), y.tolist()):
        keys, values = row[0:context:2], row[1:context:2]
        assert len(set(keys)) == 5 and all(1 <= k < half for k in keys)
        assert len(set(values)) == 5 and all(half <= v < 40 for v in values)
        answers = [t for t, v in enumerate(target) if v != mqar.IGNORE]
        assert len(answers) == 5  # each key asked once
        for t in answers:
            assert t >= context and (t - context) % 2 == 0
            j = keys.index(row[t])  # the query is a key of the context ...
            assert target[t] == values[j]  # ... and the answer its value
            gaps.append((t - context) // 2)
        assert sorted(row[t] for t in answers) == sorted(keys)
    space = (50 - context) // 2
    # Power law with a = 0.01: most queries come early (uniform gaps would give a median of 10).
    assert torch.tensor(gaps).float().median() < space / 4


def evaluate_prefix(tokens: list[str]) -> int:
    """ListOps value by a stack machine over the token list (independent of the generator)."""
    stack: list[list] = []
    value = None
    for tok in tokens:
        if tok.startswith("["):
            stack.append([tok])
        elif tok == "]":
            op, *args = stack.pop()
            if op == "[MAX":
                value = max(args)
            elif op == "[MIN":
                value = min(args)
            elif op == "[MED":
                s = sorted(args)
                mid = len(s) // 2
                value = s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) // 2
            else:
                value = sum(args) % 10
            if stack:
                stack[-1].append(value)
        else:
            stack[-1].append(int(tok))
    assert not stack
    return value


def depth(tokens: list[str]) -> int:
    level = deepest = 0
    for tok in tokens:
        level += tok.startswith("[")
        deepest = max(deepest, level)
        level -= tok == "]"
    return deepest


def test_listops_labels_match_an_independent_evaluator():
    spec = listops.ListOpsSpec(max_len=90, min_len=21, max_depth=5, max_args=6)
    x, y = listops.listops_batch(spec, 150, __import__("random").Random(3))
    assert x.shape == (150, 90)
    depths = []
    for ids, label in zip(x.tolist(), y.tolist()):
        tokens = [listops.TOKENS[i] for i in ids if i != listops.PAD]
        assert 21 <= len(tokens) <= 90 and tokens[0].startswith("[")
        assert ids[len(tokens):] == [listops.PAD] * (90 - len(tokens))  # padding at the end
        depths.append(depth(tokens))
        assert evaluate_prefix(tokens) == label
    # The tree's levels are 1..max_depth and digits fill the last: operators nest 4 deep at most.
    assert min(depths) > 1 and max(depths) == 4
    assert len(set(y.tolist())) > 5  # labels spread over the classes


def test_training_batches_never_hold_a_held_out_example():
    # Tiny vocabularies make collisions frequent, so the exclusion has work to do.
    task = make_task("mqar", 8, pairs=2, vocab=8, test_count=64)
    held = {tuple(r) for r in task.test_set[0].tolist()}
    gen = torch.Generator().manual_seed(0)
    raw = mqar.mqar_batch(task.spec, 512, torch.Generator().manual_seed(0))[0].tolist()
    assert any(tuple(r) in held for r in raw)  # the generator alone would leak
    x, _ = task.train_batch(512, gen)
    assert 0 < len(x) < 512 and not {tuple(r) for r in x.tolist()} & held
    ops = make_task("listops", 6, min_len=4, max_depth=2, max_args=3, test_count=64, pool=256)
    x, _ = ops.train_batch(256, gen)
    assert not {tuple(r) for r in x.tolist()} & {tuple(r) for r in ops.test_set[0].tolist()}


def test_character_corpus_splits_by_file():
    files = charlm.corpus_files()
    train_files, test_files = charlm.split_files(files)
    assert test_files and not set(train_files) & set(test_files)
    assert len(train_files) + len(test_files) == len(files)
    corpus = charlm.load_corpus()
    train_text = corpus.train.numpy().tobytes()
    for f in test_files[:3]:
        probe = f.read_bytes()[-300:]  # a file's end is its own code, not a licence header
        assert probe not in train_text
    assert corpus.info["train_bytes"] + corpus.info["test_bytes"] > 1_000_000
    x, y = charlm.test_windows(corpus.test, 64, 4)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1:, 0], y[:-1, -1])


class NanAfter(torch.nn.Module):
    """Softmax attention that returns NaN from its `after`-th call on."""

    def __init__(self, after: int):
        super().__init__()
        self.calls, self.after = 0, after

    def forward(self, q, k, v):
        self.calls += 1
        out = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return out * float("nan") if self.calls >= self.after else out


def test_a_diverging_run_names_its_step():
    task = make_task("mqar", 16, pairs=2, vocab=16, test_count=8)
    recipe = Recipe(dim=16, layers=1, heads=1, batch=4, tokens=4 * 16 * 30)
    out = train(task, lambda: NanAfter(12), recipe, torch.device("cpu"), torch.float32, 0)
    assert out.diverged_at == 12 and len(out.curve) == 11 and not out.metrics


def test_softmax_learns_mqar_through_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    code = run_bench.main(["--suite", "task", "--task", "mqar", "--variant", "softmax_naive",
                           "--in-process", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    df = pd.read_csv(out / "results.csv")
    assert set(df["suite"]) == {"task"} and set(df["inputs"]) == {"task:mqar"}
    assert set(df["status"]) == {"ok"} and set(df["seed"]) == {0}
    value = dict(zip(df["metric"], df["value"]))
    chance = 1 / 16  # 16 values in the upper half of a 32-token vocabulary
    assert value["accuracy"] > 2.5 * chance
    assert value["train_tokens_per_s"] > 0 and value["attn_fwd_bwd_ms"] > 0
    curve = pd.read_csv(out / "curves" / "softmax_naive_mqar_N32_seed0.csv")
    assert len(curve) == 200 and curve["train_loss"].iloc[-20:].mean() < curve["train_loss"].iloc[:20].mean()
    text = write_report(out)
    assert "softmax_naive" in text and (out / "plots" / "tasks-curves.png").is_file()


def rows(values: dict[tuple[str, str], list[float]]) -> pd.DataFrame:
    """Task rows: {(variant, task): [metric per seed]}, families from the names."""
    out = []
    for (variant, task), per_seed in values.items():
        metric = "bpc" if task == "charlm" else "accuracy"
        family = {"fmmformer": "fmm", "fma": "multipole"}.get(variant, variant)
        for seed, v in enumerate(per_seed):
            out.append({"variant": variant, "family": family, "suite": "task", "seq_len": 64,
                        "inputs": f"task:{task}", "seed": seed, "metric": metric, "value": v,
                        "status": "ok"})
    return pd.DataFrame(out)


def test_claim_check_reads_orderings_both_ways():
    df = task_rows(rows({("softmax", "charlm"): [1.0, 1.2], ("fmmformer", "charlm"): [1.3, 1.3],
                         ("linear", "charlm"): [1.4, 1.4], ("fmmformer", "listops"): [0.4],
                         ("linear", "listops"): [0.3], ("softmax", "listops"): [0.5]}))
    claims = claim_check(df).set_index("claim")
    assert claims.loc["bpc softmax <= fmmformer <= linear", "verdict"] == "holds"
    assert claims.loc["accuracy fmmformer >= linear", "verdict"] == "holds"
    assert claims.loc["accuracy fmmformer >= softmax", "verdict"] == "does not hold"
    assert claims.loc["accuracy softmax >= linear", "verdict"] == "n/a"  # no MQAR rows
    assert "softmax 1.100 ± 0.141" in claims.loc["bpc softmax <= fmmformer <= linear", "measured"]
    worse = df.assign(value=df["value"].where(df["variant"] != "fmmformer", 1.5))
    assert claim_check(worse).set_index("claim").loc[
        "bpc softmax <= fmmformer <= linear", "verdict"] == "does not hold"
    table = quality_table(df).set_index("variant")
    assert table.loc["softmax", "charlm N=64 bpc"] == "1.100 ± 0.141"


def write_task_run(root: Path, values: dict[tuple[str, str], list[float]]) -> Path:
    """A run directory whose results.csv holds the task rows of `rows(values)`."""
    fill = dict(run_id="t", params="{}", observed="{}", mode="fwd_bwd", batch=1, heads=1,
                head_dim=16, dtype="fp32", causal=False, device="cpu", unit="", reason="")
    root.mkdir()
    rows(values).assign(**fill)[list(COLUMNS)].to_csv(root / RESULTS_FILE, index=False)
    return root


def test_the_claim_check_is_a_studys_section_of_the_task_report(tmp_path, monkeypatch, capsys):
    from harness.reports import study

    run = write_task_run(tmp_path / "run", {("softmax", "mqar"): [0.9, 0.7],
                                            ("linear", "mqar"): [0.3]})
    readme = tmp_path / "README.md"
    readme.write_text("<!-- tasks:start -->\n<!-- tasks:end -->\n")
    load_studies()
    monkeypatch.setattr(study, "_STUDIES", {})
    assert run_bench.main(["tasks", str(run), "--readme", str(readme)]) == 0
    out = capsys.readouterr().out
    assert "| linear | 0.300 |" in out and "| softmax | 0.800 ± 0.141 |" in out
    assert "claim" not in (out + readme.read_text() + (run / "tasks.md").read_text()).lower()

    done = subprocess.run([sys.executable, "run_bench.py", "tasks", str(run), "--readme",
                           str(readme)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    verdict = ("| accuracy softmax >= linear | mqar N=64 | Zoology: attention solves MQAR, linear "
               "attention does not | softmax 0.800 ± 0.141; linear 0.300 | holds |")
    for text in (done.stdout, readme.read_text(), (run / "tasks.md").read_text()):
        assert "| linear | 0.300 |" in text and "**Claim check** (means over seeds" in text
        assert verdict in text


SHORT_ONLY = """
from harness.registry import register_variant

@register_variant("short_only", family="softmax",
                  check=lambda shape, p: "takes N <= 16" if shape.seq_len > 16 else None)
def make(shape):
    return lambda q, k, v: v
"""


@pytest.mark.parametrize("args, says", [
    (["--suite", "task,time"], "the task suite runs alone"),
    (["--suite", "task", "--task", "mqar", "--variant", "short_only", "--plugin", "{plugin}"],
     "short_only cannot run N=32 causal=True: takes N <= 16"),
])
def test_bad_task_input_is_one_line(tmp_path, capsys, args, says):
    plugin = tmp_path / "short.py"
    plugin.write_text(SHORT_ONLY)
    try:
        code = run_bench.main([*(a.replace("{plugin}", str(plugin)) for a in args),
                               "--out", str(tmp_path / "r")])
    finally:
        unregister_variant("short_only")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and says in err, err


def test_unknown_task_is_one_line_from_outside(tmp_path):
    result = subprocess.run([sys.executable, "run_bench.py", "--suite", "task", "--task",
                             "sudoku", "--out", str(tmp_path / "r")], cwd=ROOT, text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "unknown task 'sudoku'; valid: mqar, listops, charlm" in result.stderr


def test_learnable_weights_of_a_variant_train_with_the_model():
    from harness.registry import Shape, get_variant
    from suites.tasks.model import TaskModel
    from suites.tasks.train import optimizer
    from variants import load_builtin_variants

    load_builtin_variants()
    shape = Shape(2, 2, 24, 8, True)
    model = TaskModel(16, 24, 16, 2, 2, lambda: get_variant("fmmformer").factory(
        shape, bandwidth=3, kernels=2, blend="sigmoid"))
    blends = [p for n, p in model.named_parameters() if n.endswith("near_logit")]
    assert len(blends) == 2  # one FMMformer per block, each with its own weights
    opt = optimizer(model, Recipe())
    x = torch.randint(16, (2, 24))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    assert all(p.abs().sum() > 0 for p in blends)  # they start at 0 and moved
