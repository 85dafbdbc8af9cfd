"""On an NVIDIA GPU: check `cudnn` and `blockwise` against `dense`, then time them.

    python bench/gpu_attention.py [--lengths 8192,32768] [--out bench/results/gpu_attention.json]

Self-contained apart from hybridlm itself. For each length and mask (full causal and a
causal window of 4096), in bfloat16 (cuDNN flash attention takes bf16/fp16):
  1. correctness: forward outputs and q/k/v gradients of cudnn and blockwise against
     dense, on a short prefix (1024 tokens, where dense fits easily), max abs error;
  2. speed: best-of-N forward+backward wall time of cudnn, blockwise and dense at the
     full length (dense skipped where its T x T scores would not fit in memory).
Prints a table with the card's name and writes JSON. Exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybridlm import ops  # noqa: E402
from hybridlm.ops import cudnn  # noqa: E402

CHECK_LENGTH = 1024
TOLERANCE = {"out": 2e-2, "grad": 5e-2}  # bf16 inputs, f32 accumulation


def inputs(t: int, heads: int, kv_heads: int, head_dim: int, batch: int = 1):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, t, heads, head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(key, (batch, t, kv_heads, head_dim), jnp.bfloat16)
            for key in keys[1:3])
    cot = jax.random.normal(keys[3], q.shape, jnp.float32)
    return q, k, v, cot


def fwd_bwd(impl: str, spec: ops.MaskSpec):
    def loss(q, k, v, cot):
        out = ops.attention(q, k, v, spec, impl)
        return jnp.sum(out.astype(jnp.float32) * cot), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def max_errors(impl: str, spec: ops.MaskSpec, shape: dict) -> dict:
    q, k, v, cot = inputs(CHECK_LENGTH, **shape)
    (_, want), want_grads = fwd_bwd("dense", spec)(q, k, v, cot)
    (_, got), got_grads = fwd_bwd(impl, spec)(q, k, v, cot)
    err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))  # noqa: E731
    scale = max(float(jnp.max(jnp.abs(g.astype(jnp.float32)))) for g in want_grads)
    return {"out": err(got, want),
            "grad": max(err(g, w) for g, w in zip(got_grads, want_grads, strict=True)) / scale}


def wall(impl: str, spec: ops.MaskSpec, t: int, shape: dict, repeats: int) -> float:
    q, k, v, cot = inputs(t, **shape)
    fn = fwd_bwd(impl, spec)
    jax.block_until_ready(fn(q, k, v, cot))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(q, k, v, cot))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="8192,32768")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dense-max-length", type=int, default=16384)
    p.add_argument("--out", default="bench/results/gpu_attention.json")
    args = p.parse_args()
    if not cudnn.on_nvidia_gpu():
        print(f"no NVIDIA GPU here (JAX backend: {jax.default_backend()}); nothing to do")
        return 2
    card = jax.devices()[0].device_kind
    shape = dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    masks = {"causal": ops.MaskSpec(causal=True), "window4096": ops.MaskSpec(window=4096)}
    rows, ok = [], True
    for name, spec in masks.items():
        for impl in ("cudnn", "blockwise"):
            errors = max_errors(impl, spec, shape)
            good = errors["out"] <= TOLERANCE["out"] and errors["grad"] <= TOLERANCE["grad"]
            ok &= good
            rows.append({"check": name, "impl": impl, **errors, "ok": good})
            print(f"check {name:10s} {impl:9s} out {errors['out']:.2e} "
                  f"grad {errors['grad']:.2e} {'ok' if good else 'MISMATCH'}", flush=True)
    timings = []
    for t in (int(x) for x in args.lengths.split(",")):
        for name, spec in masks.items():
            for impl in ("cudnn", "blockwise", "dense"):
                if impl == "dense" and t > args.dense_max_length:
                    seconds = None
                else:
                    seconds = wall(impl, spec, t, shape, args.repeats)
                timings.append({"T": t, "mask": name, "impl": impl, "fwd_bwd_s": seconds})
                shown = "skipped (T x T scores too big)" if seconds is None else f"{seconds:.4f} s"
                print(f"T={t:6d} {name:10s} {impl:9s} {shown}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"card": card, "jax": jax.__version__, "shape": shape,
                               "checks": rows, "timings": timings}, indent=2) + "\n")
    print(f"card: {card}; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
