"""On an NVIDIA GPU: check `cudnn` and `blockwise` against `dense`, then time them.

    python bench/gpu_attention.py [--lengths 8192,32768] [--out bench/results/gpu_attention.json]

Self-contained apart from hybridlm itself. For each length and mask (full causal and a
causal window of 4096, each unpacked and packed: rows of documents with segment ids),
in bfloat16 (cuDNN flash attention takes bf16/fp16):
  1. correctness: forward outputs and q/k/v gradients of cudnn and blockwise against
     dense, on a short prefix (1024 tokens, where dense fits easily), max abs error;
  2. speed: best-of-N forward+backward wall time of cudnn, blockwise and dense at the
     full length (dense skipped where its T x T scores would not fit in memory).
Prints a table with the card's name and writes JSON. Exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybridlm import ops  # noqa: E402
from hybridlm.ops import cudnn  # noqa: E402

CHECK_LENGTH = 1024
TOLERANCE = {"out": 2e-2, "grad": 5e-2}  # bf16 inputs, f32 accumulation
DOCUMENT_FRACTION = 1 / 8  # packed rows: document lengths average T / 8


class Fallbacks(logging.Handler):
    """Collects ops.attention's fallback warnings: which kernel really ran."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def with_segments(spec: ops.MaskSpec, t: int, batch: int = 1,
                  mean_length: float | None = None) -> ops.MaskSpec:
    """The same mask over packed rows: documents of random lengths (mean T/8)."""
    rng = jax.random.key(1)
    mean_length = mean_length or t * DOCUMENT_FRACTION
    starts = jax.random.uniform(rng, (batch, t)) < 1 / mean_length
    ids = jnp.cumsum(starts.at[:, 0].set(True), axis=1).astype(jnp.int32)
    return ops.MaskSpec(causal=spec.causal, window=spec.window, q_segment_ids=ids,
                        kv_segment_ids=ids)


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
    spec = spec(CHECK_LENGTH)
    (_, want), want_grads = fwd_bwd("dense", spec)(q, k, v, cot)
    (_, got), got_grads = fwd_bwd(impl, spec)(q, k, v, cot)
    err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))  # noqa: E731
    scale = max(float(jnp.max(jnp.abs(g.astype(jnp.float32)))) for g in want_grads)
    return {"out": err(got, want),
            "grad": max(err(g, w) for g, w in zip(got_grads, want_grads, strict=True)) / scale}


def wall(impl: str, spec, t: int, shape: dict, repeats: int) -> float:
    q, k, v, cot = inputs(t, **shape)
    fn = fwd_bwd(impl, spec(t))
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
    p.add_argument("--impls", default="cudnn,blockwise,dense", help="kernels to time")
    p.add_argument("--timings-only", action="store_true", help="skip the checks")
    p.add_argument("--out", default="bench/results/gpu_attention.json")
    args = p.parse_args()
    if not cudnn.on_nvidia_gpu():
        print(f"no NVIDIA GPU here (JAX backend: {jax.default_backend()}); nothing to do")
        return 2
    card = jax.devices()[0].device_kind
    shape = dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    causal, window = ops.MaskSpec(causal=True), ops.MaskSpec(window=4096)
    masks = {"causal": lambda t: causal, "window4096": lambda t: window,
             "packed_causal": lambda t: with_segments(causal, t),
             "packed_window4096": lambda t: with_segments(window, t)}
    # > cudnn.MAX_SEGMENTS documents in a row: the lax.cond's blockwise branch runs
    many = {"packed_many_docs": lambda t: with_segments(window, t, mean_length=8)}
    fallbacks = Fallbacks()
    logging.getLogger("hybridlm.ops.attention").addHandler(fallbacks)
    rows, ok = [], True
    for name, spec in ({} if args.timings_only else {**masks, **many}).items():
        for impl in ("cudnn", "blockwise"):
            seen = len(fallbacks.messages)
            try:
                errors = max_errors(impl, spec, shape)
            except Exception as e:  # noqa: BLE001  (a kernel that fails to build is a result)
                traceback.print_exc()
                errors = {"out": float("inf"), "grad": float("inf"), "error": repr(e)[:500]}
            good = errors["out"] <= TOLERANCE["out"] and errors["grad"] <= TOLERANCE["grad"]
            ok &= good
            fell_back = fallbacks.messages[seen:]
            rows.append({"check": name, "impl": impl, **errors, "ok": good,
                         "fallback": fell_back})
            print(f"check {name:18s} {impl:9s} out {errors['out']:.2e} "
                  f"grad {errors['grad']:.2e} {'ok' if good else 'MISMATCH'}"
                  + (f" (FELL BACK: {fell_back})" if fell_back else ""), flush=True)
    packed_memory = []  # cuDNN's packed layout: scratch memory against the segment bound
    for bound in () if args.timings_only else (16, 64, 256):
        cudnn.MAX_SEGMENTS = bound
        q, k, v, cot = inputs(8192, **shape)
        try:
            compiled = fwd_bwd("cudnn", masks["packed_causal"](8192)).lower(q, k, v, cot).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
        except Exception as e:  # noqa: BLE001
            temp = repr(e)[:200]
        packed_memory.append({"T": 8192, "max_segments": bound, "temp_bytes": temp})
        print(f"packed cudnn T=8192 max_segments={bound}: temp bytes {temp}", flush=True)
    cudnn.MAX_SEGMENTS = 16
    timings = []
    for t in (int(x) for x in args.lengths.split(",")):
        for name, spec in masks.items():
            for impl in args.impls.split(","):
                seconds, error = None, None
                if impl == "dense" and t > args.dense_max_length:
                    error = "skipped (T x T scores too big)"
                else:
                    try:
                        seconds = wall(impl, spec, t, shape, args.repeats)
                    except Exception as e:  # noqa: BLE001
                        error = repr(e)[:300]
                timings.append({"T": t, "mask": name, "impl": impl, "fwd_bwd_s": seconds,
                                "error": error})
                shown = error if seconds is None else f"{seconds:.4f} s"
                print(f"T={t:6d} {name:18s} {impl:9s} {shown}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"card": card, "jax": jax.__version__, "shape": shape,
                               "checks": rows, "packed_memory": packed_memory,
                               "timings": timings}, indent=2) + "\n")
    print(f"card: {card}; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
