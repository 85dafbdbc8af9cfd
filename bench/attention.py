"""Dense vs blockwise attention: XLA-counted cost and wall time, plus the paper's
train-step saving at 16k. Prints a table and writes JSON.

    python bench/attention.py                       # T 2k..32k, W in {512, 4096}
    python bench/attention.py --lengths 2048,4096 --windows 512 --repeats 2
    python bench/attention.py --lengths= --step-length 0   # only the model timings

Per (T, W) cell, for each kernel: forward+backward FLOPs and temp bytes from XLA's cost
analysis (loop-free programs, so every step is counted), forward FLOPs against the exact
matmul count of visible pairs, and the best of `--repeats` forward+backward wall times.
Dense cells whose scratch memory would not fit (`--max-bytes`) get cost numbers only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybridlm import config as config_lib  # noqa: E402
from hybridlm import ops  # noqa: E402
from hybridlm.ops.cost import (  # noqa: E402
    attention_cost,
    attention_matmul_flops,
    compiled_cost,
    visible_pairs,
)


def wall_time(impl: str, t: int, window: int, args) -> float:
    """Best forward+backward wall time in seconds over args.repeats (after one warm-up)."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (args.batch, t, args.heads, args.head_dim))
    k, v = (jax.random.normal(key, (args.batch, t, args.kv_heads, args.head_dim))
            for key in keys[1:])
    spec = ops.MaskSpec(causal=True, window=window)
    grad = jax.jit(jax.grad(lambda q, k, v: ops.attention(q, k, v, spec, impl).sum(),
                            argnums=(0, 1, 2)))
    jax.block_until_ready(grad(q, k, v))
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(grad(q, k, v))
        best = min(best, time.perf_counter() - start)
    return best


def attention_cells(args) -> list[dict]:
    shape = dict(batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
                 head_dim=args.head_dim)
    rows = []
    for t in args.lengths:
        for w in args.windows:
            exact = attention_matmul_flops(visible_pairs(t, window=w), args.batch, args.heads,
                                           args.head_dim)
            row = {"T": t, "W": w, "exact_fwd_matmul_flops": exact}
            for impl in ("dense", "blockwise"):
                start = time.perf_counter()
                both = attention_cost(impl, length=t, window=w, **shape)
                fwd = attention_cost(impl, length=t, window=w, backward=False, **shape)
                cell = {"flops": both["flops"], "temp_bytes": both["temp_bytes"],
                        "fwd_flops": fwd["flops"], "fwd_flops_over_exact": fwd["flops"] / exact}
                if both["temp_bytes"] > args.max_bytes:
                    cell["wall_s"] = None
                    cell["note"] = f"not run: scratch {both['temp_bytes'] / 1e9:.1f} GB"
                else:
                    cell["wall_s"] = wall_time(impl, t, w, args)
                row[impl] = cell
                print(f"  T={t} W={w} {impl}: {time.perf_counter() - start:.0f} s", flush=True)
            rows.append(row)
    return rows


def train_step_costs(args) -> list[dict]:
    """rnope_swa vs all-full (rnope) train step at 16k, tiny width, per kernel."""
    import optax
    from flax import nnx

    from hybridlm.model import Transformer
    from hybridlm.model.attention import config_tiles
    from hybridlm.train.step import make_train_step

    t, rows = args.step_length, []
    for impl in ("blockwise", "dense"):
        for variant in ("rnope_swa", "rnope"):
            start = time.perf_counter()
            cfg = config_lib.load(f"configs/paper.py:variant={variant},window=1024,"
                                  f"seq_len={t}", [
                                      "model.d_model=64", "model.num_heads=4",
                                      "model.num_kv_heads=4", "model.head_dim=16",
                                      "model.mlp_dim=128", "model.vocab_size=300",
                                      f"model.attention_impl={impl}",
                                      "model.attention_block_q=1024",
                                      "model.attention_block_kv=1024"])
            model_cfg = dict(cfg.model.to_dict(), scan_layers=False)
            abstract = nnx.eval_shape(lambda c=model_cfg: Transformer(c, rngs=nnx.Rngs(0)))
            graphdef, params = nnx.split(abstract, nnx.Param)
            tx = optax.adamw(1e-3)
            tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
            with ops.kernel_tiles(*config_tiles(model_cfg)):  # as the trainer traces it
                cost = compiled_cost(make_train_step(graphdef, tx),
                                     (params, jax.eval_shape(tx.init, params)),
                                     {"inputs": tokens, "targets": tokens})
            rows.append({"impl": impl, "variant": variant, "T": t, **cost})
            print(f"  train step {impl} {variant}: {time.perf_counter() - start:.0f} s",
                  flush=True)
    return rows


MODEL_CASES = [  # (name, config, overrides, batch, length)
    ("tiny (rnope_swa, W=128)", "configs/tiny.py", [], 8, 512),
    ("reference (rope, d 256, vocab 8192)", "configs/paper.py:variant=rope,seq_len=1024",
     ["model.vocab_size=8192"], 4, 1024),
]


def model_times(args) -> list[dict]:
    """Forward+backward wall time of the 4-layer model (loss gradient), per kernel."""
    from flax import nnx

    from hybridlm.model import Transformer
    from hybridlm.train.step import loss_fn

    rows = []
    for name, spec, overrides, batch, length in MODEL_CASES:
        for impl in ("dense", "blockwise"):
            cfg = config_lib.load(spec, overrides + [f"model.attention_impl={impl}"])
            graphdef, params = nnx.split(Transformer(cfg.model.to_dict(), rngs=nnx.Rngs(0)),
                                         nnx.Param)
            tokens = jax.random.randint(jax.random.key(0), (batch, length), 0,
                                        cfg.model.vocab_size)
            data = {"inputs": tokens, "targets": tokens}
            grad = jax.jit(jax.grad(lambda p, d, g=graphdef: loss_fn(p, g, d)))
            jax.block_until_ready(grad(params, data))
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(grad(params, data))
                best = min(best, time.perf_counter() - start)
            rows.append({"model": name, "batch": batch, "T": length, "impl": impl,
                         "fwd_bwd_s": best})
            print(f"  model {name} {impl}: {best:.2f} s", flush=True)
    return rows


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def table(rows: list[dict], steps: list[dict], models: list[dict]) -> str:
    out = ["| T | W | kernel | fwd+bwd GFLOP | fwd / exact | temp | fwd+bwd wall s |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        for impl in ("dense", "blockwise"):
            c = r[impl]
            wall = f"{c['wall_s']:.2f}" if c["wall_s"] is not None else c["note"]
            out.append(f"| {r['T']} | {r['W']} | {impl} | {c['flops'] / 1e9:.1f} | "
                       f"{c['fwd_flops_over_exact']:.2f} | {fmt_bytes(c['temp_bytes'])} | "
                       f"{wall} |")
    if steps:
        out += ["", f"| train step (T={steps[0]['T']}) | kernel | GFLOP | temp |",
                "|---|---|---|---|"]
        for s in steps:
            out.append(f"| {s['variant']} | {s['impl']} | {s['flops'] / 1e9:.1f} | "
                       f"{fmt_bytes(s['temp_bytes'])} |")
    if models:
        out += ["", "| model | B x T | kernel | fwd+bwd wall s |", "|---|---|---|---|"]
        for m in models:
            out.append(f"| {m['model']} | {m['batch']} x {m['T']} | {m['impl']} | "
                       f"{m['fwd_bwd_s']:.2f} |")
    return "\n".join(out)


def machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
            "jax": jax.__version__, "commit": commit,
            "date": datetime.date.today().isoformat()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--lengths", type=ints, default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--windows", type=ints, default=[512, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-bytes", type=float, default=4e9,
                   help="skip the wall time of cells whose XLA scratch exceeds this")
    p.add_argument("--step-length", type=int, default=16384,
                   help="train-step comparison length (0: skip)")
    p.add_argument("--models", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the 4-layer model's forward+backward per kernel")
    p.add_argument("--out", default="bench/results/attention.json")
    args = p.parse_args()
    np.set_printoptions(precision=3)
    print(f"attention bench on {machine()}", flush=True)
    rows = attention_cells(args)
    steps = train_step_costs(args) if args.step_length else []
    models = model_times(args) if args.models else []
    print(table(rows, steps, models))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "settings": vars(args), "cells": rows,
                               "train_step": steps, "models": models}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
