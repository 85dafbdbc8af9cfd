"""Train a sequence longer than one device holds, with context parallelism.

    python bench/context_memory.py                   # T=16k, tiny RNoPE-SWA, 8 fake CPU devices
    python bench/context_memory.py --length 32768 --device-gb 1 --steps 2

1. Compiles the training step for one device (mesh.context=1) and reads XLA's memory
   analysis: per-device bytes = arguments + outputs + temporaries - aliased (donated) bytes.
2. Trains `--steps` steps with mesh.context=N (the sequence split N ways) through the
   ordinary trainer, and reads the same analysis of the very step it compiled and ran.
3. Declares a device of `--device-gb` (fake CPU devices have no memory limit of their own,
   so the capacity is stated, not discovered) and reports which step fits.
Writes everything to JSON.
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
from hybridlm.model import abstract_model  # noqa: E402
from hybridlm.parallel import make_mesh  # noqa: E402
from hybridlm.train import trainer  # noqa: E402
from hybridlm.train.optim import decay_mask, make_optimizer  # noqa: E402
from hybridlm.train.state import make_layout  # noqa: E402


def load_config(args, context: int):
    return config_lib.load(
        f"configs/paper.py:variant=rnope_swa,size=tiny,seq_len={args.length},"
        f"window={args.window}",
        ["train.batch_size=1", f"train.steps={args.steps}", "train.warmup_steps=0",
         "log.every=1", "eval.steps=0", "mesh.data=1", f"mesh.context={context}",
         f"mesh.context_attention={args.context_attention}"])


def memory_row(m, context: int, seconds: float) -> dict:
    """Per-device bytes from a compiled step's memory analysis."""
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
             m.alias_size_in_bytes)
    return {"context": context, "argument_bytes": m.argument_size_in_bytes,
            "output_bytes": m.output_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
            "alias_bytes": m.alias_size_in_bytes, "per_device_bytes": total,
            "compile_s": round(seconds, 1)}


def step_memory(args, context: int) -> dict:
    """XLA's per-device memory analysis of the training step, compiled but not run."""
    cfg = load_config(args, context)
    mesh = make_mesh(cfg.mesh, jax.devices()[:context])
    graphdef, meta = abstract_model(cfg.model.to_dict(), cfg.train.seed)
    tx = make_optimizer(cfg.train, decay_mask(meta))
    layout = make_layout(graphdef, meta, tx, mesh)
    start = time.perf_counter()
    compiled = trainer.compile_train_step(cfg, mesh, layout, tx)
    return memory_row(compiled.memory_analysis(), context, time.perf_counter() - start)


def train_recording_memory(args) -> tuple[list[dict], dict]:
    """Train with mesh.context=N; also return the memory analysis of the step it ran."""
    recorded = {}
    compile_step = trainer.compile_train_step

    def recording(cfg, mesh, layout, tx):
        start = time.perf_counter()
        compiled = compile_step(cfg, mesh, layout, tx)
        recorded.update(memory_row(compiled.memory_analysis(), mesh.shape["context"],
                                   time.perf_counter() - start))
        return compiled

    trainer.compile_train_step = recording
    try:
        workdir = args.workdir or tempfile.mkdtemp(prefix="context_memory_")
        return trainer.train(load_config(args, args.context), workdir), recorded
    finally:
        trainer.compile_train_step = compile_step


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
    rows = [step_memory(args, 1)]
    start = time.perf_counter()
    history, trained = train_recording_memory(args)
    losses = [row["loss"] for row in history]
    print(f"trained {args.steps} steps of T={args.length} with mesh.context={args.context} "
          f"in {time.perf_counter() - start:.0f} s: losses {[round(x, 4) for x in losses]}")
    rows.append(trained)
    for row in rows:
        row["fits"] = row["per_device_bytes"] <= capacity
        print(f"mesh.context={row['context']}: {row['per_device_bytes'] / 1e9:.3f} GB per "
              f"device (temp {row['temp_bytes'] / 1e9:.3f} GB) -> "
              f"{'fits' if row['fits'] else 'does not fit'} a {args.device_gb} GB device "
              f"(compiled in {row['compile_s']} s)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "settings": vars(args), "memory": rows,
                               "history": history}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
