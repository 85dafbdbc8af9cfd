"""The training loop, in sections: setup, data, model and optimizer, loop.

This is the single-device loop of the foundation: the model, optimizer and step are the
ones the sharded trainer uses; the data is a seeded window sampler over the built-in
corpus (hybridlm/data/stream.py), so batch k depends only on (seed, k).
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from hybridlm import config as config_lib
from hybridlm.data.corpus import stdlib_documents
from hybridlm.data.stream import split_stream, token_stream, window_batch
from hybridlm.data.tokenizers import get_tokenizer
from hybridlm.model import Transformer, flops_per_token
from hybridlm.train.metrics import MetricsWriter
from hybridlm.train.optim import make_optimizer, schedule
from hybridlm.train.step import make_eval_step, make_train_step

VAL_FRACTION = 0.02


def load_tokens(cfg: mlc.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    if cfg.data.source != "stdlib":
        raise config_lib.ConfigError(f"data.source {cfg.data.source!r} is not available; "
                                     "use 'stdlib'")
    stream = token_stream(stdlib_documents(), get_tokenizer(cfg.data.tokenizer))
    return split_stream(stream, VAL_FRACTION)


def train(cfg: mlc.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Train for cfg.train.steps; returns the last logged metrics."""
    # ---- setup ---------------------------------------------------------------------
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, workdir / "config.json")
    t, seq_len = cfg.train, cfg.data.seq_len

    # ---- data ----------------------------------------------------------------------
    train_tokens, val_tokens = load_tokens(cfg)
    print(f"data: {len(train_tokens):,} training tokens, {len(val_tokens):,} validation tokens",
          flush=True)

    # ---- model and optimizer -------------------------------------------------------
    model = Transformer(config_lib.model_dict(cfg), rngs=nnx.Rngs(params=t.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(t)
    state = (params, tx.init(params))
    example = {k: jnp.asarray(v) for k, v in
               window_batch(train_tokens, t.batch_size, seq_len, t.seed, 0).items()}
    compile_start = time.perf_counter()
    train_step = jax.jit(make_train_step(graphdef, tx), donate_argnums=0).lower(
        state, example).compile()
    eval_step = jax.jit(make_eval_step(graphdef))
    lr_at = schedule(t)
    flops = flops_per_token(config_lib.model_dict(cfg), seq_len)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"model: {n_params:,} parameters, {flops / 1e6:.1f} MFLOPs per token; compiled in "
          f"{time.perf_counter() - compile_start:.1f} s", flush=True)

    # ---- loop ----------------------------------------------------------------------
    writer = MetricsWriter(workdir, t.steps)
    last: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0
    for step in range(t.steps):
        batch = {k: jnp.asarray(v) for k, v in
                 window_batch(train_tokens, t.batch_size, seq_len, t.seed, step).items()}
        state, metrics = train_step(state, batch)
        window_steps += 1
        done = step + 1
        if done % cfg.log.every == 0 or done == t.steps:
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - window_start
            step_time = elapsed / window_steps
            last = {"loss": float(metrics["loss"]), "lr": float(lr_at(step)),
                    "grad_norm": float(metrics["grad_norm"]),
                    "tokens_per_s": t.batch_size * seq_len / step_time,
                    "step_time_s": step_time, "mfu": None}
            if done == t.steps:
                val = window_batch(val_tokens, t.batch_size, seq_len, t.seed + 1, 0)
                last["val_loss"] = float(eval_step(state[0], val))
            writer.write(done, last)
            window_start, window_steps = time.perf_counter(), 0
    writer.close()
    return last
