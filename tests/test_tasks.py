"""Trained tasks: the generators against their definitions, no train/test leakage, a short
training run that solves MQAR through the whole command line, divergence of the loss, the
gradients, the weights or the held-out logits, the held-out windows, what is measured, the
reports and claim check, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import run_bench
from harness.registry import unregister_variant
from harness.results import COLUMNS, RESULTS_FILE, load_results
from harness.reports import tasks as tasks_report
from harness.reports.tasks import quality_table, task_rows, write_report
from harness.summary import summary_tables
from studies import load_studies
from studies.fmmformer.task_claims import claim_check
from suites.tasks import catalog, charlm, listops, mqar
from suites.tasks.catalog import make_task
from suites.tasks.presets import SETTINGS
from suites.tasks.train import Outcome, Recipe, train

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
    x, y = charlm.test_windows(corpus.test, 64, 4, 128)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1::2, 0], y[::2, -1])


def test_held_out_windows_cover_the_whole_text_and_the_same_span_at_every_length():
    text = torch.arange(10_000) % 251  # each character says where it is (mod 251)
    scored, starts = {}, {}
    for n in (16, 32, 64):
        x, y = charlm.test_windows(text.to(torch.uint8), n, 5, 64)
        assert x.shape == (5 * 64 // n, n) and torch.equal(x[:, 1:], y[:, :-1])
        starts[n] = charlm.test_windows(torch.arange(10_000), n, 5, 64)[0][:, 0].tolist()
        scored[n] = {t for s in starts[n] for t in range(s + 1, s + n + 1)}  # target positions
    assert scored[16] == scored[32] == scored[64] and len(scored[64]) == 5 * 64
    assert min(scored[64]) == 1 and max(scored[64]) == 10_000 - 1  # from the start to the end
    gaps = {b - a for a, b in zip(starts[64], starts[64][1:])}
    assert max(gaps) - min(gaps) <= 1  # evenly spread, up to rounding


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
    assert out.diverged == "training loss"


class NanGradient(torch.autograd.Function):
    """Identity forward; a NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class BadAt(torch.nn.Module):
    """Softmax attention whose gradient turns NaN at training step `grad_step` (one call a step),
    or whose output turns NaN once the model is put in eval mode (`in_eval`)."""

    def __init__(self, grad_step: int = 0, in_eval: bool = False):
        super().__init__()
        self.calls, self.grad_step, self.in_eval = 0, grad_step, in_eval

    def forward(self, q, k, v):
        out = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        if not self.training:
            return out * float("nan") if self.in_eval else out
        self.calls += 1
        return NanGradient.apply(out) if self.calls == self.grad_step else out


@pytest.mark.parametrize("variant, step, what", [
    (lambda: BadAt(grad_step=8), 8, "gradient norm"),  # the last step: the loss never sees it
    (lambda: BadAt(in_eval=True), 8, "held-out logits"),
])
def test_nan_gradients_and_held_out_logits_are_divergence(variant, step, what):
    task = make_task("mqar", 16, pairs=2, vocab=16, test_count=8)
    recipe = Recipe(dim=16, layers=1, heads=1, batch=4, tokens=4 * 16 * 8)
    out = train(task, variant, recipe, torch.device("cpu"), torch.float32, 0)
    assert not out.metrics and out.diverged_at == step
    assert out.diverged == what


def test_softmax_solves_mqar_through_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    code = run_bench.main(["--suite", "task", "--task", "mqar", "--variant", "softmax_naive",
                           "--in-process", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    df = pd.read_csv(out / "results.csv")
    assert set(df["suite"]) == {"task"} and set(df["inputs"]) == {"task:mqar"}
    assert set(df["status"]) == {"ok"} and set(df["seed"]) == {0} and set(df["dtype"]) == {"fp32"}
    value = dict(zip(df["metric"], df["value"]))
    observed = json.loads(df["observed"].iloc[0])
    pairs = observed["task"]["pairs"]
    # Picking one of the context's values scores 1/pairs: solving it is far above that.
    assert pairs == 4 and value["accuracy"] > 0.5 + 1 / pairs
    assert observed["trained_in"] == "fp32"
    assert value["train_tokens_per_s"] > 0 and value["attn_fwd_bwd_ms"] > 0
    curve = pd.read_csv(out / "curves" / "softmax_naive_mqar_N32_seed0.csv")
    assert len(curve) == observed["task"]["recipe"]["tokens"] // (32 * 32)
    assert curve["train_loss"].iloc[-20:].mean() < 0.1 * curve["train_loss"].iloc[:20].mean()
    text = write_report(out)
    assert "softmax_naive" in text and (out / "plots" / "tasks-curves.png").is_file()


def stub_train(diverge: str):
    """A `train` that records whether the data was made before it ran, and returns at once
    (diverged for the task `diverge`)."""
    made = []

    def fake(task, attention, recipe, device, dtype, seed, progress=None):
        made.append((task.name, charlm.load_corpus.cache_info().currsize,
                     catalog._listops_pool.cache_info().currsize))
        if task.name == diverge:
            return Outcome(curve=[{"step": 1, "tokens": 1, "train_loss": 1.0}], diverged_at=3,
                           diverged="training loss")
        return Outcome(metrics={task.metric: 0.5, "train_tokens_per_s": 1.0,
                                "final_train_loss": 1.0})
    return fake, made


def test_data_is_made_before_the_measured_run_and_a_failed_row_keeps_its_setting(
        tmp_path, monkeypatch, capsys):
    import suites.task

    fake, made = stub_train(diverge="charlm")
    peaks = []

    def peak(fn, device):  # the measured region: the data must be there already
        peaks.append((charlm.load_corpus.cache_info().currsize,
                      catalog._listops_pool.cache_info().currsize))
        fn()
        return 1.0

    monkeypatch.setattr(suites.task, "train", fake)
    monkeypatch.setattr(suites.task, "peak_extra_mib", peak)
    monkeypatch.setattr(suites.task, "cpu_memory_supported", lambda: None)
    charlm.load_corpus.cache_clear()
    catalog._listops_pool.cache_clear()
    out = tmp_path / "run"
    code = run_bench.main(["--suite", "task", "--task", "listops,charlm", "--variant",
                           "softmax_naive", "--in-process", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert peaks == [(0, 1), (1, 1)]  # ListOps' pool, then the corpus, before each run
    df = load_results(out / RESULTS_FILE)
    failed = df[df["status"] == "nan"].iloc[0]
    assert failed["inputs"] == "task:charlm" and "training loss turned NaN/Inf at step 3" in \
        failed["reason"]
    observed = json.loads(failed["observed"])
    assert observed["task"]["task"] == "charlm" and observed["task"]["recipe"]["lr"] > 0
    # The end-of-run summary names each column's task and has no table for an absent metric.
    tables = summary_tables(df)
    assert [t.title for t in tables] == ["task accuracy (held out)"]
    assert [c.header for c in tables[0].columns][3:] == ["task:charlm N=64", "task:listops N=64"]


LRA_FMM = '{"bandwidth": 5, "blend": "sigmoid", "kernels": 2}'


def rows(values: dict[tuple[str, str], list[float | None]],
         params: str = LRA_FMM) -> pd.DataFrame:
    """Task rows: {(variant, task): [metric per seed, None for a failed seed]}, families from
    the names, FMMformer's `params`."""
    out = []
    for (variant, task), per_seed in values.items():
        metric = "bpc" if task == "charlm" else "accuracy"
        family = {"fmmformer": "fmm", "fma": "multipole"}.get(variant, variant)
        for seed, v in enumerate(per_seed):
            out.append({"variant": variant, "family": family, "suite": "task", "seq_len": 64,
                        "inputs": f"task:{task}", "seed": seed, "metric": metric, "value": v,
                        "status": "ok" if v is not None else "nan",
                        "params": params if family == "fmm" else "{}"})
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
    assert "softmax 1.100 ± 0.141 (2/2 seeds)" in claims.loc["bpc softmax <= fmmformer <= linear",
                                                             "measured"]
    assert "fmmformer (k=5, r=2) 0.400 (1/1 seeds)" in claims.loc["accuracy fmmformer >= linear",
                                                                  "measured"]
    worse = df.assign(value=df["value"].where(df["variant"] != "fmmformer", 1.5))
    assert claim_check(worse).set_index("claim").loc[
        "bpc softmax <= fmmformer <= linear", "verdict"] == "does not hold"
    table = quality_table(df).set_index("variant")
    assert table.loc["softmax", "charlm N=64 bpc"] == "1.100 ± 0.141"


def verdicts(values, params: str = LRA_FMM) -> dict[str, str]:
    claims = claim_check(task_rows(rows(values, params)))
    return dict(zip(claims["claim"], claims["verdict"]))


def test_a_claim_needs_every_seed_a_baseline_that_learned_and_the_claims_configuration():
    # The smoke run that called MQAR "solved": softmax picks one of the 4 context values.
    stuck = verdicts({("softmax", "mqar"): [0.254], ("linear", "mqar"): [0.164]})
    assert stuck["accuracy softmax >= linear"].startswith("n/a (softmax did not learn mqar N=64")
    assert verdicts({("softmax", "mqar"): [0.99], ("linear", "mqar"): [0.3]})[
        "accuracy softmax >= linear"] == "holds"
    failed = claim_check(task_rows(rows({("softmax", "mqar"): [0.99, None, 0.97],
                                         ("linear", "mqar"): [0.3, 0.2, 0.4]})))
    assert failed["measured"].iloc[-1].startswith("softmax 0.980 ± 0.014 (2/3 seeds)")
    assert failed["verdict"].iloc[-1] == "n/a (seeds failed (softmax 2/3 ok))"
    listops_runs = {("softmax", "listops"): [0.5], ("fmmformer", "listops"): [0.6],
                    ("linear", "listops"): [0.4]}
    assert verdicts(listops_runs)["accuracy fmmformer >= softmax"] == "holds"
    default = verdicts(listops_runs, '{"bandwidth": 30, "blend": "sigmoid", "kernels": 3}')
    assert default["accuracy fmmformer >= softmax"] == (
        "n/a (fmm ran as k=30, r=3, not the claim's configuration (k in {5}, r in {1, 2}))")


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
               "attention does not | softmax 0.800 ± 0.141 (2/2 seeds); linear 0.300 (1/1 seeds) "
               "| holds |")
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
    (["--suite", "task", "--task", "mqar", "--seq-lens", "64", "--non-causal", "--heads", "8"],
     "from its preset's task settings; drop --seq-lens, --heads, --causal/--non-causal (it "
     "takes --task, --variant"),
    (["--suite", "task", "--task", "mqar", "--dtype", "bf16"],
     "--dtype bf16 cannot train on cpu; valid there: fp32"),
    (["--preset", "quick", "--suite", "task", "--task", "mqar"],
     "the task suite runs the presets tasks or tasks-smoke, got --preset quick"),
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


def test_listops_padding_is_at_most_a_quarter_of_the_sequence():
    for preset in SETTINGS.values():
        for setting in (s for s in preset if s.task == "listops"):
            assert 4 * setting.make().spec.min_len >= 3 * setting.seq_len, setting
    task = make_task("listops", 64, max_depth=4, max_args=5, test_count=32)
    x, _ = task.test_set
    assert ((x == listops.PAD).sum(1) <= 64 // 4).all()


def captured_figure(monkeypatch, draw, *args):
    """The figure that the report function `draw` saves, drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figures = []
    monkeypatch.setattr(tasks_report, "save", lambda fig, path, tight: figures.append(fig) or [])
    draw(*args, Path("unused"))
    FigureCanvasAgg(figures[0]).draw()
    return figures[0]


def test_quality_vs_speed_labels_its_time_axis_within_a_decade(monkeypatch):
    df = task_rows(rows({("softmax", "mqar"): [0.9], ("linear", "mqar"): [0.4]}))
    times = df.assign(metric="attn_fwd_bwd_ms", value=df["variant"].map({"softmax": 1.2,
                                                                           "linear": 3.4}))
    ax = captured_figure(monkeypatch, tasks_report.plot_quality_vs_speed,
                         pd.concat([df, times])).axes[0]
    lo, hi = ax.get_xlim()
    ticks = ax.xaxis.get_major_ticks() + ax.xaxis.get_minor_ticks()
    assert [t for t in ticks if lo <= t.get_loc() <= hi and t.label1.get_text()]


def test_learning_curves_are_found_for_labels_with_brackets_and_slashes(tmp_path, monkeypatch):
    labels = ["fmmformer[k=20,r=2]", "plug/in"]
    df = task_rows(rows({(label, "mqar"): [0.5, 0.6] for label in labels}))
    (tmp_path / "curves").mkdir()
    for label in labels:  # named as the task suite names them ('/' made '-')
        for seed in (0, 1):
            path = tmp_path / "curves" / f"{label.replace('/', '-')}_mqar_N64_seed{seed}.csv"
            path.write_text("step,tokens,train_loss\n1,64,2.0\n2,128,1.0\n")
    ax = captured_figure(monkeypatch, tasks_report.plot_curves, tmp_path, df).axes[0]
    assert len(ax.lines) == 4 and {t.get_text() for t in ax.get_legend().get_texts()} == set(labels)


def test_fp16_training_is_refused_on_cuda_too():
    """The training loop does no loss scaling, so fp16 would underflow gradients silently: a
    task run refuses it on CUDA as on a CPU, and bf16 is the low precision it trains in."""
    from harness.config import BenchConfig
    from suites.task import check_task_config
    from suites.tasks.catalog import TaskError

    check_task_config(BenchConfig(preset="tasks", device="cuda", suites=("task",), dtype="bf16"))
    with pytest.raises(TaskError, match="--dtype fp16 cannot train on cuda; valid there: "
                                        "fp32, bf16"):
        check_task_config(BenchConfig(preset="tasks", device="cuda", suites=("task",),
                                      dtype="fp16"))
