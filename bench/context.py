"""Bytes each device sends per training step for one attention layer, sequence split over
`context`: windowed layers (halo exchange) vs full causal layers (all-gather or ring).

    python bench/context.py                      # T=32k over 4 devices, the paper's 8B heads
    python bench/context.py --length 8192 --window 1024 --no-baseline

For each layer type and context setting, one attention layer's forward+backward (the
gradient of sum(attention(q, k, v))) is compiled for a mesh of `--shards` fake CPU devices
with q, k, v, positions and segment ids split along the sequence. Nothing runs: the bytes
come from the collectives in the compiled HLO (collective-permute, all-gather,
reduce-scatter, all-reduce, all-to-all) and are counted per device as a ring algorithm sends
them: a permute sends its operand from each source, an all-gather (n-1)/n of its result,
a reduce-scatter (n-1)/n of its operand, an all-reduce 2(n-1)/n. The busiest device is
reported, next to the analytic count. The `gspmd` rows are the same layer with no
context-parallel handler: what XLA's partitioner does by itself with a sharded sequence.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import machine  # noqa: E402

from hybridlm import ops  # noqa: E402
from hybridlm.parallel import activation_sharding, batch_sharding, make_mesh  # noqa: E402
from hybridlm.parallel.context import context_parallel  # noqa: E402
from hybridlm.parallel.rules import ACTIVATION_RULES, logical_to_spec  # noqa: E402

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute",
               "all-to-all")
OP = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
SHAPE = re.compile(r"(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
         "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def shape_bytes(text: str) -> int:
    return sum(BYTES[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
               for dt, dims in SHAPE.findall(text))


def group_size(line: str, default: int) -> int:
    if m := re.search(r"replica_groups=\{\{([0-9,]+)\}", line):
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=\[\d+,(\d+)\]", line):
        return int(m.group(1))
    return default


def hlo_bytes_sent(hlo: str, shards: int) -> dict:
    """{op: bytes the busiest device sends} and the count of each op, from compiled HLO."""
    per_device = np.zeros(shards)
    by_op: dict[str, float] = {}
    counts: dict[str, int] = {}
    for line in hlo.splitlines():
        m = OP.search(line)
        if not m or "-done" in line:
            continue
        result, op = shape_bytes(m.group(1)), m.group(2)
        counts[op] = counts.get(op, 0) + 1
        if op == "collective-permute":
            pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
            sources = [int(p.split(",")[0]) for p in
                       re.findall(r"\{(\d+,\d+)", pairs.group(1) + "}")] if pairs else []
            sent = np.zeros(shards)
            for s in sources:
                sent[s % shards] += result
        else:
            n = group_size(line, shards)
            share = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1,
                     "all-reduce": 2 * (n - 1) / n, "all-to-all": (n - 1) / n}[op]
            sent = np.full(shards, result * share)
        per_device += sent
        by_op[op] = by_op.get(op, 0.0) + float(sent.max())
    return {"bytes": float(per_device.max()), "by_op": by_op, "ops": counts}


def analytic_bytes(kind: str, impl: str, layout: str, args) -> float | None:
    """Bytes the busiest device sends for one layer, forward + backward.

    Per token: K and V rows (2 * Hkv * D * bytes) forward, their gradients backward, and
    positions + segment ids (2 int32) forward. A full layer receives the n - 1 other shards'
    tokens and sends back their K/V gradients (XLA keeps the gathered K/V for the backward
    pass rather than fetching them again, so no second fetch is counted).
    """
    kv = 2 * args.kv_heads * args.head_dim * jnp.dtype(args.dtype).itemsize * args.batch
    ids = 2 * 4 * args.batch
    n, local = args.shards, args.length // args.shards
    if kind == "window":
        halos = 2 if layout == "zigzag" else 1  # zigzag: both chunks have a left neighbour
        return halos * (args.window - 1) * (2 * kv + ids)
    if impl == "gspmd":
        return None
    return (n - 1) * local * (2 * kv + ids)


def layer_cell(kind: str, impl: str, layout: str, args, devices) -> dict:
    mesh_cfg = {"data": 1, "fsdp": 1, "context": args.shards, "tensor": 1,
                "context_attention": impl, "context_layout": layout}
    mesh = make_mesh(mesh_cfg, devices[:args.shards])
    b, t = args.batch, args.length
    dtype = jnp.dtype(args.dtype)
    q = jax.ShapeDtypeStruct((b, t, args.heads, args.head_dim), dtype)
    kv = jax.ShapeDtypeStruct((b, t, args.kv_heads, args.head_dim), dtype)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
    window = args.window if kind == "window" else None

    def loss(q, k, v, positions, segments):
        spec = ops.MaskSpec(window=window, q_segment_ids=segments, kv_segment_ids=segments,
                            q_positions=positions, kv_positions=positions)
        return jnp.sum(ops.attention(q, k, v, spec, args.impl).astype(jnp.float32))

    def spec_of(names, shape):
        return jax.sharding.NamedSharding(mesh, logical_to_spec(names, shape, mesh,
                                                                ACTIVATION_RULES))

    shardings = (spec_of(("batch", "length", "heads", "head_dim"), q.shape),
                 *[spec_of(("batch", "length", "kv_heads", "head_dim"), kv.shape)] * 2,
                 batch_sharding(mesh), batch_sharding(mesh))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), in_shardings=shardings,
                   out_shardings=shardings[:3])
    start = time.perf_counter()
    with activation_sharding(mesh):
        if impl == "gspmd":
            compiled = grad.lower(q, kv, kv, ids, ids).compile()
        else:
            with context_parallel(mesh, mesh_cfg):
                compiled = grad.lower(q, kv, kv, ids, ids).compile()
    counted = hlo_bytes_sent(compiled.as_text(), args.shards)
    memory = compiled.memory_analysis()
    shown = "halo" if kind == "window" and impl != "gspmd" else impl
    return {"layer": kind, "impl": shown, "layout": layout, **counted,
            "analytic_bytes": analytic_bytes(kind, impl, layout, args),
            "temp_bytes": memory.temp_size_in_bytes,
            "compile_s": round(time.perf_counter() - start, 1)}


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def table(rows: list[dict], args) -> str:
    out = [f"T={args.length}, {args.shards} context shards, B={args.batch}, H={args.heads}, "
           f"Hkv={args.kv_heads}, D={args.head_dim}, {args.dtype}, window={args.window}; "
           "bytes the busiest device sends per layer, forward + backward", "",
           "| layer | context attention | layout | HLO bytes sent | analytic | collectives |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        ops_text = ", ".join(f"{n} {op}" for op, n in sorted(r["ops"].items()))
        out.append(f"| {r['layer']} | {r['impl']} | {r['layout']} | {fmt(r['bytes'])} | "
                   f"{fmt(r['analytic_bytes'])} | {ops_text or 'none'} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="float32",
                   help="K/V dtype (XLA:CPU upcasts bfloat16 collectives to float32)")
    p.add_argument("--impl", default="blockwise", help="the per-device kernel")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also compile the layers under plain GSPMD (no handler)")
    p.add_argument("--out", default="bench/results/context.json")
    args = p.parse_args()
    devices = jax.devices()
    cells = [("window", "allgather", "zigzag"), ("window", "allgather", "contiguous"),
             ("full", "allgather", "zigzag"), ("full", "ring", "zigzag")]
    if args.baseline:
        cells += [("window", "gspmd", "contiguous"), ("full", "gspmd", "contiguous")]
    rows = []
    for kind, impl, layout in cells:
        rows.append(layer_cell(kind, impl, layout, args, devices))
        print(f"{kind} {impl} {layout}: {fmt(rows[-1]['bytes'])} sent "
              f"(analytic {fmt(rows[-1]['analytic_bytes'])}), "
              f"compiled in {rows[-1]['compile_s']} s", flush=True)
    print(table(rows, args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "settings": vars(args), "rows": rows},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
