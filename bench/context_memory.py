"""Train a sequence longer than one device holds, with context parallelism.

    python bench/context_memory.py                   # T=16k, tiny RNoPE-SWA, 8 fake CPU devices
    python bench/context_memory.py --length 32768 --device-gb 1 --steps 2

1. Compiles the training step for one device (mesh.context=1) and for `--context` devices
   (mesh.context=N, the sequence split N ways) and reads XLA's memory analysis of each:
   per-device bytes = arguments + outputs + temporaries - aliased (donated) bytes.
2. Declares a device of `--device-gb` (fake CPU devices have no memory limit of their own,
   so the capacity is stated, not discovered) and reports which steps fit.
3. Trains `--steps` steps with mesh.context=N through the ordinary trainer and prints the
   logged losses. Writes everything to JSON.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import machine  # noqa: E402

from hybridlm import config as config_lib  # noqa: E402
from hybridlm.parallel import make_mesh  # noqa: E402
from hybridlm.train.optim import decay_mask, make_optimizer  # noqa: E402
from hybridlm.train.state import abstract_model, make_layout  # noqa: E402
from hybridlm.train.trainer import compile_train_step, train  # noqa: E402


def load_config(args, context: int):
    return config_lib.load(
        f"configs/paper.py:variant=rnope_swa,size=tiny,seq_len={args.length},"
        f"window={args.window}",
        ["train.batch_size=1", f"train.steps={args.steps}", "train.warmup_steps=0",
         "log.every=1", "eval.steps=0", "mesh.data=1", f"mesh.context={context}",
         f"mesh.context_attention={args.context_attention}"])


def step_memory(args, context: int) -> dict:
    """XLA's per-device memory analysis of the compiled training step."""
    cfg = load_config(args, context)
    devices = jax.devices()[:context]
    mesh = make_mesh(cfg.mesh, devices)
    graphdef, meta = abstract_model(cfg.model.to_dict(), cfg.train.seed)
    tx = make_optimizer(cfg.train, decay_mask(meta))
    layout = make_layout(graphdef, meta, tx, mesh)
    start = time.perf_counter()
    m = compile_train_step(cfg, mesh, layout, tx).memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
             m.alias_size_in_bytes)
    return {"context": context, "argument_bytes": m.argument_size_in_bytes,
            "output_bytes": m.output_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
            "alias_bytes": m.alias_size_in_bytes, "per_device_bytes": total,
            "compile_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--context", type=int, default=8)
    p.add_argument("--context-attention", default="ring")
    p.add_argument("--device-gb", type=float, default=0.5,
                   help="the declared memory of one device")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--workdir", default="")
    p.add_argument("--out", default="bench/results/context_memory.json")
    args = p.parse_args()
    capacity = args.device_gb * 1e9
    rows = []
    for context in (1, args.context):
        row = step_memory(args, context)
        row["fits"] = row["per_device_bytes"] <= capacity
        rows.append(row)
        print(f"mesh.context={context}: {row['per_device_bytes'] / 1e9:.2f} GB per device "
              f"(temp {row['temp_bytes'] / 1e9:.2f} GB) -> "
              f"{'fits' if row['fits'] else 'does not fit'} a {args.device_gb} GB device "
              f"(compiled in {row['compile_s']} s)", flush=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="context_memory_")
    start = time.perf_counter()
    history = train(load_config(args, args.context), workdir)
    losses = [row["loss"] for row in history]
    print(f"trained {args.steps} steps of T={args.length} with mesh.context={args.context} "
          f"in {time.perf_counter() - start:.0f} s: losses {[round(x, 4) for x in losses]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "settings": vars(args), "memory": rows,
                               "history": history}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
