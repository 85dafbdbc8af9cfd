"""The size of one blockwise attention layer's compiled program, and its compile time.

    python bench/kernel_program.py                        # 2k, 8k, 32k; causal and W=1024
    python bench/kernel_program.py --checkout ../other --out /tmp/k.json   # another tree

One layer, forward + backward (the gradient of sum(attention)), B=1, H=4 (kv 4), D=64,
float32, default tiles, compiled only (nothing runs): instructions of the optimised HLO
(`hybridlm.ops.cost.hlo_instructions`'s count), its text lines, compile seconds (wall, one
run: noisy on a shared machine) and XLA's temp bytes. `--checkout` measures another tree's
kernel the same way. JSON to bench/results/kernel_program.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from machine import cpu_name, git_commit  # noqa: E402  (bench/machine.py)

INSTRUCTION = r"^\s+(ROOT )?%?[\w.\-]+ = "  # hybridlm.ops.cost's count (older trees lack it)


def measure(length: int, window: int | None) -> dict:
    from hybridlm.ops import MaskSpec, blockwise_attention

    spec = MaskSpec(causal=True, window=window)
    x = jax.ShapeDtypeStruct((1, length, 4, 64), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(blockwise_attention(q, k, v, spec, scale=0.125))

    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    seconds = time.perf_counter() - start
    text = compiled.as_text()
    return {"seq_len": length, "window": window,
            "instructions": len(re.findall(INSTRUCTION, text, re.MULTILINE)),
            "lines": text.count("\n"), "compile_s": seconds,
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="2048:none,2048:1024,8192:none,8192:1024,"
                   "32768:none,32768:1024", help="length:window (none: full causal), ...")
    p.add_argument("--checkout", default=str(ROOT), help="the tree whose kernel to measure")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "kernel_program.json"))
    args = p.parse_args()
    sys.path.insert(0, str(Path(args.checkout).resolve()))
    rows = []
    for case in args.cases.split(","):
        length, window = case.split(":")
        row = measure(int(length), None if window == "none" else int(window))
        rows.append(row)
        print(f"T={row['seq_len']:6d} window={row['window']}: {row['instructions']:,} "
              f"instructions, {row['lines']:,} lines, compiled in {row['compile_s']:.1f} s, "
              f"temp {row['temp_bytes'] / 1e6:.0f} MB", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
        "checkout": str(Path(args.checkout).resolve()), "commit": git_commit(args.checkout),
        "jax": jax.__version__, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
