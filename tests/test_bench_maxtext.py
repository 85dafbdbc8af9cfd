"""bench/peer_maxtext.py: hybridlm's config translated into MaxText's settings (no MaxText
needed: the translation is standard-library code that the peer's own Python runs)."""

import importlib.util

import pytest

from hybridlm.config import REPO_ROOT, load

_spec = importlib.util.spec_from_file_location("peer_maxtext",
                                               REPO_ROOT / "bench" / "peer_maxtext.py")
peer_maxtext = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer_maxtext)

# bench/train.py's cases: configs/paper.py size=tiny with an 8192-token vocabulary
CASE = "configs/paper.py:variant={},size=tiny,seq_len={},window=1024"
CASE_OVERRIDES = ["model.vocab_size=8192", "mesh.data=1"]


def settings(spec: str, overrides: list[str]) -> dict:
    return peer_maxtext.maxtext_settings(load(spec, CASE_OVERRIDES + overrides).to_dict())


def test_reference_and_8k_rows_are_the_shapes_maxtext_ran():
    # STACK_NOTES.md's side-by-side run: d 256, 4 layers, 4x64 heads, MLP 1024, vocab 8192,
    # f32, seq 1024 batch 4 (reference) and seq 8192 batch 1 (rnope_swa's row, MaxText dense)
    reference = settings(CASE.format("rope", 1024), ["train.batch_size=4"])
    shape = {"decoder_block": "llama2", "base_emb_dim": 256, "base_num_decoder_layers": 4,
             "base_num_query_heads": 4, "base_num_kv_heads": 4, "head_dim": 64,
             "base_mlp_dim": 1024, "vocab_size": 8192, "dtype": "float32",
             "logits_via_embedding": True, "mlp_activations": "['silu','linear']",
             "attention": "dot_product", "rope_max_timescale": 10000, "opt_type": "adamw"}
    assert {k: reference[k] for k in shape} == shape
    assert (reference["max_target_length"], reference["per_device_batch_size"]) == (1024, 4)
    long = settings(CASE.format("rnope_swa", 8192), ["train.batch_size=1"])
    assert {k: long[k] for k in shape} == shape  # windows and NoPE: MaxText runs full RoPE
    assert (long["max_target_length"], long["per_device_batch_size"]) == (8192, 1)


def test_every_field_comes_from_its_own_source():
    got = settings(CASE.format("rope", 512), [
        "model.d_model=192", "model.num_layers=3", "model.num_heads=6", "model.num_kv_heads=2",
        "model.head_dim=32", "model.mlp_dim=768", "model.activation=gelu",
        "model.tie_embeddings=False", "model.norm_eps=1e-5", "model.remat=full",
        "model.layer_types.global.rope_theta=500000.0", "model.dtype=bfloat16",
        "data.packing=concat", "train.batch_size=3", "train.seed=7", "train.learning_rate=1e-3",
        "train.b1=0.8", "train.b2=0.99", "train.weight_decay=0.05", "train.grad_clip=0.5",
        "train.z_loss=1e-4"])
    assert got == {
        "decoder_block": "llama2", "base_emb_dim": 192, "base_num_decoder_layers": 3,
        "base_num_query_heads": 6, "base_num_kv_heads": 2, "head_dim": 32, "base_mlp_dim": 768,
        "mlp_activations": "['gelu','linear']", "vocab_size": 8192,
        "logits_via_embedding": False, "normalization_layer_epsilon": 1e-5,
        "dtype": "bfloat16", "weight_dtype": "float32", "remat_policy": "full",
        "attention": "dot_product", "max_target_length": 512,
        "grain_packing_type": "concat_then_split", "per_device_batch_size": 3,
        "init_weights_seed": 7, "opt_type": "adamw", "learning_rate": 1e-3, "adam_b1": 0.8,
        "adam_b2": 0.99, "adam_weight_decay": 0.05, "gradient_clipping_threshold": 0.5,
        "z_loss_multiplier": 1e-4, "rope_max_timescale": 500000}


@pytest.mark.parametrize("override, field", [
    ("model.norm=layernorm", "model.norm"),
    ("model.layer_types.global.qk_norm=pre_rope", "model.layer_types.global.qk_norm"),
    ("train.optimizer=adafactor", "train.optimizer"),
])
def test_what_maxtext_cannot_express_is_named(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        settings(CASE.format("rope", 512), [override])
