"""Hugging Face interop: transformers is the oracle.

Tiny random models of each exportable shape must give the same logits in hybridlm and in
transformers (loaded offline from the exported directory), position by position, on random
tokens longer than the window/chunk; checkpoints saved by transformers must import and
export back bit for bit; configs with no exact counterpart are refused with their fields.
transformers and torch are imported unconditionally: without the [hf] extra these tests
fail, they never skip.
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from hybridlm import config as config_lib
from hybridlm.config import ConfigError
from hybridlm.data.tokenizers import ByteTokenizer, HFTokenizer, train_bpe
from hybridlm.interop import hf, hf_config
from hybridlm.model import Transformer, abstract_model
from tests.helpers import neighbour_model_config, tiny_model_config

T = 29  # > window 5 and chunk 6 of the tiny configs: every mask boundary is crossed


def full_config(model_cfg):
    cfg = config_lib.defaults()
    model_cfg.attention_impl = "dense"
    cfg.model = model_cfg
    cfg.data.seq_len = 64
    return cfg


def random_model(model_cfg, seed: int = 0) -> Transformer:
    """A model with random numpy parameters: N(0, 0.3^2) weights, norm scales 1 + N(0, 0.2^2)
    (not ones, so a misplaced norm weight shows). No per-op compiles, unlike eager init."""
    graphdef, state = abstract_model(model_cfg.to_dict())
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        return 1.0 + 0.2 * noise if path[-1].key == "scale" else 0.3 * noise

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
        draw, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def tiny(name: str, **overrides):
    m = tiny_model_config("rnope_swa") if name == "paper" else neighbour_model_config(name)
    for k, v in overrides.items():
        m[k] = v
    return m


def hf_logits(directory, tokens, **kwargs) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), local_files_only=True, **kwargs)
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def random_tokens(vocab: int, seed: int = 1):
    return jax.random.randint(jax.random.key(seed), (2, T), 0, vocab)


def assert_same_logits(ours, theirs):
    """float32 agreement at every position (a window/chunk bug shows at the positions past it)."""
    assert ours.shape == theirs.shape
    for t in range(ours.shape[1]):
        np.testing.assert_allclose(ours[:, t], theirs[:, t], rtol=1e-4, atol=1e-4,
                                   err_msg=f"position {t}")


EXPORTS = {  # case: (model config, the architecture it must export as)
    "cohere2_8_layers": (lambda: tiny("cohere2", num_layers=8), "cohere2"),  # 2 scanned groups
    "paper_rnope_swa": (lambda: tiny("paper"), "smollm3"),  # the paper's stack, as released
    "llama4_6_layers": (lambda: tiny("llama4", num_layers=6, allow_partial_pattern=True),
                        "llama4"),  # one group + a 2-layer tail; untied LM head
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """case -> (config, model, export directory, tokens, hybridlm logits), each built once
    per process and only when a test asks for it (xdist workers build what they run)."""
    cache = {}

    def get(case):
        if case not in cache:
            make, arch = EXPORTS[case]
            cfg = full_config(make())
            model = random_model(cfg.model)
            directory = tmp_path_factory.mktemp(case)
            assert hf.save_hf(cfg, model, directory) == arch
            tokens = random_tokens(cfg.model.vocab_size)
            cache[case] = (cfg, model, directory, tokens, np.asarray(model(tokens)))
        return cache[case]

    return get


@pytest.mark.parametrize("case", sorted(EXPORTS))
def test_export_matches_transformers(case, exported):
    cfg, _, directory, tokens, ours = exported(case)
    assert np.abs(ours).max() > 1.0  # large enough that a wrong layer would show
    hf_cfg = json.loads((directory / "config.json").read_text())
    assert hf_cfg["architectures"] == [hf_config.ARCHS[EXPORTS[case][1]][0]]
    assert_same_logits(ours, hf_logits(directory, tokens))  # sdpa, transformers' default
    assert_same_logits(ours, hf_logits(directory, tokens, attn_implementation="eager"))


def test_the_comparison_sees_a_window_off_by_one(exported, tmp_path):
    """The oracle test is sharp: an HF window one key wider differs exactly from position W."""
    cfg, _, directory, tokens, ours = exported("cohere2_8_layers")
    window = cfg.model.layer_types.local.window
    hf_cfg = json.loads((directory / "config.json").read_text())
    hf_cfg["sliding_window"] = window + 1
    shutil.copytree(directory, tmp_path / "wider")
    (tmp_path / "wider" / "config.json").write_text(json.dumps(hf_cfg))
    theirs = hf_logits(tmp_path / "wider", tokens)
    np.testing.assert_allclose(ours[:, :window], theirs[:, :window], rtol=1e-4, atol=1e-4)
    assert np.abs(ours[:, window:] - theirs[:, window:]).max(axis=(0, 2)).min() > 1e-3


TOKENS = {"bos_token_id": None, "eos_token_id": 0, "pad_token_id": None}
HF_MODELS = {  # checkpoints made by transformers itself, as a released one would be
    "cohere2": lambda: transformers.Cohere2Config(**TOKENS,
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=5, logit_scale=0.25,
        initializer_range=0.3),
    "smollm3": lambda: transformers.SmolLM3Config(**TOKENS,
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        use_sliding_window=True, sliding_window=5, initializer_range=0.3),
    "llama4": lambda: transformers.Llama4TextConfig(**TOKENS,
        vocab_size=300, hidden_size=32, intermediate_size=64, intermediate_size_mlp=48,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        moe_layers=[], attention_chunk_size=6, floor_scale=4, initializer_range=0.3),
}


@pytest.mark.parametrize("arch", sorted(HF_MODELS))
def test_import_then_export_round_trips_exactly(arch, tmp_path):
    torch.manual_seed(0)
    released = transformers.AutoModelForCausalLM.from_config(HF_MODELS[arch]())
    released.save_pretrained(tmp_path / "hf")
    cfg, model = hf.load_hf(tmp_path / "hf")
    tokens = random_tokens(cfg.model.vocab_size, seed=2)
    assert_same_logits(np.asarray(model(tokens)), hf_logits(tmp_path / "hf", tokens))
    assert hf.save_hf(cfg, model, tmp_path / "again") == arch
    before, after = load_file(tmp_path / "hf" / "model.safetensors"), \
        load_file(tmp_path / "again" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    again = hf.read_hf_config(tmp_path / "again")
    assert hf_config.from_hf_config(again) == hf_config.from_hf_config(
        hf.read_hf_config(tmp_path / "hf"))


def test_import_reads_the_per_layer_fields_transformers_derives():
    hf_cfg = HF_MODELS["smollm3"]().to_dict()
    arch, m = hf_config.from_hf_config(hf_cfg)
    assert arch == "smollm3" and m["num_layers"] == 8
    # SmolLM3 puts its window on the NoPE layers when use_sliding_window (every 4th)
    assert m["pattern"] == "rope,rope,rope,nope_window"
    assert m["layer_types"]["nope_window"]["window"] == 5
    assert m["layer_types"]["rope"]["rope_style"] == "half"


@pytest.mark.parametrize("name,expected", [
    ("qknorm", ["model.layer_types.global.qk_norm is 'pre_rope'",
                "model.norm is 'rms' (Cohere2ForCausalLM has 'layernorm')"]),
    ("gemma3", ["model.layer_types.local.qk_norm is 'pre_rope'",
                "model.layer_types.global.rope_theta is 1000000.0 (SmolLM3ForCausalLM has "
                "10000.0 at layers 5)"]),
    ("gpt_oss", ["model.layer_types.local.sink is True", "model.layer_types.global.sink"]),
])
def test_configs_without_an_exact_counterpart_are_refused(name, expected):
    m = tiny_model_config("qknorm") if name == "qknorm" else neighbour_model_config(name)
    with pytest.raises(ConfigError, match="no Hugging Face architecture") as e:
        hf_config.to_hf_config(m.to_dict())
    for text in expected:
        assert text in str(e.value)


def test_a_refused_export_writes_nothing(tmp_path):
    cfg = full_config(tiny_model_config("qknorm", num_layers=1, pattern="global"))
    model = random_model(cfg.model)
    with pytest.raises(ConfigError, match="qk_norm"):
        hf.save_hf(cfg, model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_named_architecture_lists_the_fields_that_differ():
    m = config_lib.model_dict(full_config(tiny("cohere2")))
    with pytest.raises(ConfigError) as e:
        hf_config.to_hf_config(m, "smollm3")
    message = str(e.value)
    for text in ("model.norm is 'layernorm' (SmolLM3ForCausalLM has 'rms')",
                 "model.block is 'parallel'", "model.logit_scale is 0.25",
                 "model.layer_types.local.rope_style is 'interleaved'"):
        assert text in message
    with pytest.raises(ConfigError, match="unknown HF architecture 'gpt2'"):
        hf_config.to_hf_config(m, "gpt2")


@pytest.mark.parametrize("change,message", [
    ({"moe_layers": [1]}, "mixture-of-experts"),
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
     "rope_type 'yarn'"),
    ({"attention_bias": True}, "biases"),
])
def test_imports_that_would_compute_something_else_are_refused(change, message):
    hf_cfg = {**HF_MODELS["llama4"]().to_dict(), **change}
    with pytest.raises(ConfigError, match=message):
        hf_config.from_hf_config(hf_cfg)


def test_byte_tokenizer_exports_as_an_equivalent_tokenizer_json(exported):
    _, _, directory, _, _ = exported("paper_rnope_swa")
    tok = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    text = "naïve 日本 <eos> tabs\tand\nlines"
    assert tok(text)["input_ids"] == ByteTokenizer().encode(text).tolist()
    assert tok.eos_token_id == ByteTokenizer.EOS and tok.bos_token_id == ByteTokenizer.BOS
    config = json.loads((directory / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"]) == (ByteTokenizer.EOS, 259)


def test_a_tokenizer_json_is_copied_and_imported(exported, tmp_path):
    path = tmp_path / "bpe.json"
    train_bpe(["the quick brown fox jumps over the lazy dog"] * 50, 300, path)
    cfg, model, _, _, _ = exported("paper_rnope_swa")
    cfg = config_lib.from_json(config_lib.to_json(cfg))
    cfg.data.tokenizer = str(path)
    hf.save_hf(cfg, model, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == path.read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.bos_token == "<|startoftext|>" and tok.bos_token_id == 2  # a BPE trained here
    text = "the lazy fox <|endoftext|> jumps"
    assert tok(text)["input_ids"] == HFTokenizer(path, str(path)).encode(text).tolist()
    imported, _ = hf.load_hf(tmp_path / "out")
    assert imported.data.tokenizer == str((tmp_path / "out" / "tokenizer.json").absolute())
    assert imported.data.eos_token == "<|endoftext|>"
    assert imported.data.bos_token == "<|startoftext|>"
    config_lib.validate(imported)


def test_bfloat16_and_sharded_checkpoints_are_read_exactly(tmp_path):
    """Released checkpoints are bf16 and sharded; each value must arrive unchanged."""
    torch.manual_seed(0)
    released = transformers.AutoModelForCausalLM.from_config(HF_MODELS["cohere2"]())
    released = released.to(torch.bfloat16)
    released.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    tensors = hf.read_tensors(tmp_path)
    expected = {k: v.float().numpy() for k, v in released.state_dict().items()
                if k != "lm_head.weight"}  # tied: stored once, as the embedding
    assert sorted(tensors) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)
    cfg, _ = hf.load_hf(tmp_path)
    assert cfg.model.tie_embeddings and cfg.model.logit_scale == 0.25
