"""Tiny training configs and a one-call way to build a state and a compiled step on a mesh."""

from __future__ import annotations

import jax
import numpy as np

from hybridlm import config as config_lib
from hybridlm.model import abstract_model
from hybridlm.parallel import make_mesh
from hybridlm.train.optim import decay_mask, make_optimizer
from hybridlm.train.state import init_state, make_layout
from hybridlm.train.trainer import compile_train_step

TINY = ["model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=8",
        "model.mlp_dim=64", "model.vocab_size=300", "data.seq_len=16", "train.batch_size=8",
        "train.warmup_steps=0", "log.every=1", "eval.steps=0"]


def tiny_config(*overrides: str, variant: str = "rnope_swa"):
    """A d=32 RNoPE-SWA model (window 5) on 8 x 16-token batches."""
    return config_lib.load(f"configs/paper.py:variant={variant},window=5",
                           TINY + list(overrides))


def single_device_mesh_cfg():
    return {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}


def build(cfg, mesh_cfg=None, devices=None):
    """(mesh, layout, tx, fresh state, compiled train step) for cfg on a mesh."""
    if mesh_cfg is None:
        mesh_cfg, devices = single_device_mesh_cfg(), jax.devices()[:1]
    mesh = make_mesh(mesh_cfg, devices)
    graphdef, meta = abstract_model(cfg.model.to_dict(), cfg.train.seed)
    tx = make_optimizer(cfg.train, decay_mask(meta))
    layout = make_layout(graphdef, meta, tx, mesh)
    state = init_state(cfg.model.to_dict(), tx, layout, cfg.train.seed)
    return mesh, layout, tx, state, compile_train_step(cfg, mesh, layout, tx)


def random_batch(cfg, seed: int = 0, rows: int | None = None) -> dict[str, np.ndarray]:
    rows = rows or cfg.train.batch_size
    rng = np.random.default_rng(seed)
    shape = (rows, cfg.data.seq_len)
    tokens = rng.integers(0, cfg.model.vocab_size, (rows, cfg.data.seq_len + 1))
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
            "segment_ids": np.ones(shape, np.int32), "weights": np.ones(shape, np.float32)}
