"""Small builders shared by tests: tiny model configs and models."""

from __future__ import annotations

import jax
import ml_collections as mlc
from flax import nnx

from hybridlm import config as config_lib
from hybridlm.model import Transformer

VARIANTS = ("rope", "nope", "qknorm", "rope_qknorm", "rnope", "rnope_swa")
NEIGHBOURS = ("cohere2", "llama4", "smollm3", "swan_gpt", "gemma3", "gpt_oss")


def tiny_model_config(variant: str = "rnope_swa", **model_overrides) -> mlc.ConfigDict:
    """A very small paper variant (d 32, 4 layers, window 5) for fast property tests."""
    cfg = config_lib.load(f"configs/paper.py:variant={variant},window=5", [
        "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=8",
        "model.mlp_dim=64", "model.vocab_size=300", "model.init_std=0.3"] +
        [f"model.{k}={v}" for k, v in model_overrides.items()])
    return cfg.model


def neighbour_model_config(name: str) -> mlc.ConfigDict:
    """A shipped neighbour config at size=tiny, shrunk further in width."""
    cfg = config_lib.load(f"configs/{name}.py:size=tiny", [
        "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=8",
        "model.mlp_dim=64", "model.vocab_size=300", "model.init_std=0.3"])
    for layer_type in cfg.model.layer_types.values():  # small spans so tests cross them
        if layer_type.window is not None:
            layer_type.window = 5
        if layer_type.chunk is not None:
            layer_type.chunk = 6
        if layer_type.temperature_floor is not None:
            layer_type.temperature_floor = 4
    return cfg.model


def build(model_cfg: mlc.ConfigDict, seed: int = 0):
    """A jitted forward function of a freshly initialised model (`.model` holds the model)."""
    return jitted(Transformer(model_cfg.to_dict(), rngs=nnx.Rngs(params=seed)))


def jitted(model: Transformer):
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))

    def call(*args):
        return forward(state, *args)

    call.model = model
    return call


def random_tokens(key: int, shape, vocab: int = 300) -> jax.Array:
    return jax.random.randint(jax.random.key(key), shape, 0, vocab)
