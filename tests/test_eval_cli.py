"""`hybridlm eval / analyze / generate` bodies on a tiny in-memory model, end to end: files,
JSON structure, summaries, and numbers against oracles (an untrained model's loss is about
log(vocab); the cache fraction follows (3 min(W, L) + L) / 4L)."""

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from hybridlm import cli
from hybridlm import config as config_lib
from hybridlm.eval import commands, tasks
from hybridlm.eval.analysis_math import SEGMENTS
from hybridlm.model import Transformer
from hybridlm.runs import export_params
from tests.test_data_sources import make_corpus

WINDOW = 16


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, model) of a tiny RNoPE-SWA model (untrained) on a small real corpus."""
    root = tmp_path_factory.mktemp("evalrun")
    cfg = config_lib.load(f"configs/tiny.py:seq_len=128,window={WINDOW}", [
        f"data.cache_dir={root / 'cache'}", f"data.source={make_corpus(root / 'corpus')}",
        "data.val_fraction=0.5", "model.d_model=32", "model.num_heads=4",
        "model.num_kv_heads=2", "model.head_dim=8", "model.mlp_dim=64", "model.vocab_size=300",
        "model.attention_impl=dense"])
    return cfg, Transformer(cfg.model.to_dict(), rngs=nnx.Rngs(params=0))


@pytest.mark.slow
def test_eval_all_writes_json_and_plots(run, tmp_path):
    cfg, model = run
    results = commands.run_eval(cfg, model, tmp_path, "all", lengths=[128],
                                depths=[0.0, 1.0], samples=1, step=7, progress=False)
    for name in ("niah", "ruler", "ppl"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
        saved = json.loads((tmp_path / f"{name}.json").read_text())
        assert saved["step"] == 7 and saved["summary"] == results[name]["summary"]
        assert all(isinstance(v, float) for v in saved["summary"].values())
    niah = results["niah"]
    assert np.array(niah["grid"]).shape == (2, 1) and len(niah["samples"]) == 2
    assert set(niah["summary"]) == {"niah_128", "niah", "niah_train_128", "niah_train"}
    ruler = results["ruler"]["summary"]
    assert {f"{t}_128" for t in tasks.RULER_TASKS} | {"ruler_128", "ruler"} == set(ruler)
    for summary in (niah["summary"], ruler):
        assert all(0.0 <= v <= 1.0 for v in summary.values())
    assert niah["summary"]["niah"] == 0.0  # an untrained model never writes a 7-digit needle
    (row,) = results["ppl"]["lengths"]
    assert row["length"] == 128 and row["documents"] >= 1 and row["buckets"][-1]["end"] == 128
    # init_std 0.02: near-zero logits, so the loss is about log(vocab) wherever a bucket
    # averages enough tokens (tied embeddings make a repeated token a little likelier)
    assert all(abs(b["loss"] - np.log(300)) < 0.1 for b in row["buckets"] if b["start"] >= 8)


@pytest.mark.slow
def test_cli_eval_and_generate_on_an_export(run, tmp_path, capsys):
    cfg, model = run
    export = tmp_path / "export"
    export_params(cfg, nnx.state(model, nnx.Param), export, step=5)
    assert cli.main(["eval", "--workdir", str(export), "--task", "niah", "--lengths", "128",
                     "--depths", "0.5,1", "--samples", "1", "--quiet"]) == 0
    saved = json.loads((export / "eval" / "niah.json").read_text())
    assert saved["step"] == 5 and saved["depths"] == [0.5, 1.0] and saved["lengths"] == [128]
    assert (export / "eval" / "niah.png").exists()
    out = capsys.readouterr().out
    assert "niah: niah_128=0.000, niah=0.000" in out
    assert f"evaluated step 5 of {export}; results in {export / 'eval'}/:" in out
    listed = [Path(line.strip()) for line in out.splitlines() if line.startswith("  /")]
    assert sorted(p.name for p in listed) == ["niah.json", "niah.png"]
    assert all(p.is_file() for p in listed)
    assert f"hybridlm analyze --workdir {export}" in out
    assert cli.main(["generate", "--workdir", str(export), "--prompt", "def main():",
                     "--max_new", "4"]) == 0
    out = capsys.readouterr().out
    fraction = (3 * WINDOW + 131072) / (4 * 131072)  # (3W + L) / 4L
    assert out.startswith("def main():") and f"({fraction:.1%} of it)" in out
    assert "KV cache at 16 tokens" in out and "(100.0% of it)" in out  # BOS + 11 + 4: all fit


@pytest.mark.slow
def test_analyze_masses_sum_to_one_and_the_table(run, tmp_path):
    cfg, model = run
    result = commands.run_analysis(cfg, model, tmp_path, lengths=[256], samples=2, step=3,
                                   progress=False)
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved["summary"] == result["summary"] and saved["samples"] == 2
    (r,) = saved["lengths"]
    assert r["length"] == 256 and r["samples"] == 2
    for masses in [*r["per_layer"], *r["by_type"].values(), r["overall"]]:
        assert sum(masses[s] for s in SEGMENTS) == pytest.approx(1.0, abs=1e-4)
    for row in r["per_layer"]:
        if row["type"] == "local":  # a window of 16 keys reaches neither the start nor needle
            assert row["begin"] == 0.0 and row["needle"] == 0.0
            assert row["entropy"] <= np.log(WINDOW) + 1e-4
    assert all(0.0 <= saved["summary"][f"{s}_{t}_256"] <= 1.0
               for s in SEGMENTS for t in ("local", "global", "all"))
    table = (tmp_path / "analysis.md").read_text()
    assert "| 256 | local (RoPE, window 16) x3 |" in table
    assert "| 256 | global (NoPE, full) x1 |" in table and "| 256 | all layers |" in table
    assert (tmp_path / "analysis.png").stat().st_size > 1000


def test_generate_reports_the_cache_fraction(run):
    cfg, model = run
    r = commands.generate_text(cfg, model, "def main():", max_new=4)
    assert len(r["tokens"]) == 4 and r["max_len"] == 1 + len("def main():") + 4  # BOS first
    assert r["text"] == bytes(t for t in r["tokens"] if t < 256).decode(errors="replace")
    length = 128 * 1024
    assert r["cache_128k"]["fraction"] == pytest.approx((3 * WINDOW + length) / (4 * length))
    assert r["cache"]["fraction"] == 1.0  # 16 tokens fit in every layer's window


@pytest.mark.parametrize("args,message", [
    (["eval", "--workdir", "{tmp}", "--lengths", "10"], "--lengths: 10 is too short"),
    (["eval", "--workdir", "{tmp}", "--depths", "1.5"], "--depths: 1.5"),
    (["analyze", "--workdir", "{tmp}", "--samples", "0"], "--samples must be at least 1"),
    (["generate", "--workdir", "{tmp}/missing", "--prompt", "x"], "does not exist"),
    (["generate", "--workdir", "{tmp}", "--prompt", "x"], "holds no checkpoint"),
])
def test_cli_mistakes_exit_2_with_one_message(args, message, tmp_path, capsys):
    assert cli.main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_rejects_non_numbers_in_lengths(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--workdir", str(tmp_path), "--lengths", "512,abc"])
    assert exit_info.value.code == 2
    assert "'512,abc' is not a token count" in capsys.readouterr().err
