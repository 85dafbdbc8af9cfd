"""The data section's validation rules, and `hybridlm prepare` on the command line."""

import json
import os
import subprocess
import sys

import pytest

from hybridlm.config import ConfigError, load
from tests.test_data_sources import CORPUS_FILES, make_corpus

BAD = [
    (["data.packing=zigzag"], "data.packing is 'zigzag'; choose one of"),
    (["data.val_fraction=1.0"], "data.val_fraction must be a number in [0, 1)"),
    (["data.min_doc_tokens=-1"], "data.min_doc_tokens must be an integer >= 0"),
    (["data.long_doc_tokens=-5"], "data.long_doc_tokens must be an integer >= 0"),
    (["data.long_doc_repeat=0"], "data.long_doc_repeat must be an integer >= 1"),
    (["data.eval_batches=2"], "config field 'data.eval_batches' is now eval.steps"),
    (["eval.steps=-2"], "eval.steps must be an integer >= -1 (-1: the whole validation split"),
    (["data.workers=-1"], "data.workers must be an integer >= 0"),
    (["data.on_bad_record=ignore"], "data.on_bad_record is 'ignore'; choose 'error' or 'skip'"),
    (["data.text_field="], "data.text_field must name the JSONL field"),
    (["data.source= , "], "data.source is empty"),
    (["data.weights=1,2"], "data.weights '1,2': need 1 positive numbers"),
    (["data.source=stdlib,stdlib", "data.weights=1,0"], "need 2 positive numbers"),
    (["data.weights=heavy"], "data.weights 'heavy': give comma-separated numbers"),
    (["data.tokenizer=bpe:big"], "data.tokenizer 'bpe:big': write bpe:VOCAB"),
    (["data.tokenizer=bpe:100"], "a byte-level BPE needs a vocabulary of at least 260"),
    (["data.tokenizer=bpe:1024"], "model.vocab_size (512) is smaller than the tokenizer "
     "'bpe:1024''s vocabulary (1024)"),
    (["data.tokenizer=/no/such/tokenizer.json"], "data.tokenizer '/no/such/tokenizer.json': "
     "no such file"),
    (["data.seq_len=0"], "data.seq_len must be an integer >= 1"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1][:40] for b in BAD])
def test_each_data_rule_rejects_a_bad_config_with_its_message(overrides, message):
    with pytest.raises(ConfigError) as e:
        load("configs/tiny.py", overrides)
    assert message in str(e.value)


def test_the_defaults_are_the_offline_builtin_corpus():
    cfg = load(None)
    assert (cfg.data.source, cfg.data.tokenizer, cfg.model.vocab_size) == ("stdlib", "byte", 512)
    assert load(None, ["data.source=stdlib,shakespeare", "data.weights=3,1"]).data.weights == \
        "3,1"


def run_cli(*args, cache):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HYBRIDLM_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "hybridlm.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_prepare_command_writes_a_manifest_and_reports_it(tmp_path):
    src = make_corpus(tmp_path / "corpus")
    out = tmp_path / "prepared"
    result = run_cli("prepare", "--source", str(src), "--out", str(out), cache=tmp_path / "c")
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"] == len(CORPUS_FILES)
    assert f"{len(CORPUS_FILES)} documents" in result.stdout
    assert "document length (tokens)" in result.stdout
    assert f"--config.data.source={out}" in result.stdout
    assert list(out.glob("tokens-*.array_record"))
    again = run_cli("prepare", "--source", str(src), "--out", str(out), cache=tmp_path / "c")
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    assert "Traceback" not in again.stderr


def test_prepare_command_reports_bad_input_without_a_traceback(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"text": broken}\n')
    result = run_cli("prepare", "--source", str(tmp_path / "d.jsonl"), "--quiet",
                     cache=tmp_path / "c")
    assert result.returncode == 2
    assert f"{tmp_path / 'd.jsonl'}:2: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr
    skipped = run_cli("prepare", "--source", str(tmp_path / "d.jsonl"), "--quiet",
                      "--config.data.on_bad_record=skip", cache=tmp_path / "c")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "bad_json 1" in skipped.stdout
