"""On a GPU (or TPU): train-step throughput and MFU of the paper's stack, rope vs rnope_swa.

    python bench/gpu_train.py [--budget-s 300] [--out bench/results/gpu_train.json]

Per case: configs/paper.py at a size, variant, sequence length and batch, bfloat16 compute
(float32 parameters and AdamW state), attention_impl=auto (cuDNN on NVIDIA GPUs, packed
rows included), the trainer's compiled step on one device. Batches are packed rows of
random tokens (documents of random length, mean T/4, positions restarting per document),
so the attention kernel sees segment ids as it does in real training.
Reports step time, tokens/s, model TFLOP/s (the analytic count of hybridlm.model.flops,
windowed layers counted at their window), MFU against the chip's dense bf16 peak, peak
device memory, and which attention kernel ran (a fallback is logged and recorded).
Cases run in order until --budget-s is spent; the rest are listed as skipped. The JSON is
rewritten after every case, so a lease that ends mid-run keeps the finished rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybridlm import config as config_lib  # noqa: E402
from hybridlm.model import abstract_model, flops_per_token  # noqa: E402
from hybridlm.parallel import make_mesh, put_batch  # noqa: E402
from hybridlm.train.metrics import peak_flops, peak_memory_gb  # noqa: E402
from hybridlm.train.optim import decay_mask, make_optimizer  # noqa: E402
from hybridlm.train.state import init_state, make_layout  # noqa: E402
from hybridlm.train.trainer import compile_train_step  # noqa: E402

# (size, variant, seq_len, batch): the paper's comparison at 8k, 32k and 128k, then at 1b.
CASES = [
    ("150m", "rope", 8192, 4),
    ("150m", "rnope_swa", 8192, 4),
    ("150m", "rope", 32768, 1),
    ("150m", "rnope_swa", 32768, 1),
    ("150m", "rope", 131072, 1),
    ("150m", "rnope_swa", 131072, 1),
    ("1b", "rope", 8192, 1),
    ("1b", "rnope_swa", 8192, 1),
]
WINDOW = 1024


class Fallbacks(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def packed_batch(rows: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of random-token documents (mean length T/4), as the data pipeline packs them."""
    rng = np.random.default_rng(seed)
    starts = rng.random((rows, seq_len)) < 4 / seq_len
    starts[:, 0] = True
    segment_ids = np.cumsum(starts, axis=1).astype(np.int32)
    index = np.arange(seq_len)[None, :].repeat(rows, 0)
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    tokens = rng.integers(0, vocab, (rows, seq_len + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": (index - first).astype(np.int32), "segment_ids": segment_ids,
            "weights": np.ones((rows, seq_len), np.float32)}


def run_case(size: str, variant: str, seq_len: int, batch: int, steps: int,
             overrides: list[str]) -> dict:
    cfg = config_lib.load(
        f"configs/paper.py:variant={variant},size={size},seq_len={seq_len},window={WINDOW}",
        ["model.dtype=bfloat16", f"train.batch_size={batch}", "mesh.data=1"] + overrides)
    model_cfg = cfg.model.to_dict()
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    graphdef, meta = abstract_model(model_cfg)
    tx = make_optimizer(cfg.train, decay_mask(meta))
    layout = make_layout(graphdef, meta, tx, mesh)
    state = init_state(model_cfg, tx, layout)
    start = time.perf_counter()
    step = compile_train_step(cfg, mesh, layout, tx)
    compile_s = time.perf_counter() - start
    data = put_batch(packed_batch(batch, seq_len, model_cfg["vocab_size"]), mesh, batch)
    state, metrics = step(state, data)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    tokens_per_s = batch * seq_len / step_s
    flops = flops_per_token(model_cfg, seq_len)
    peak = peak_flops(jax.devices()[0])
    return {"size": size, "variant": variant, "seq_len": seq_len, "batch": batch,
            "window": WINDOW, "compile_s": compile_s, "step_s": step_s, "all_step_s": times,
            "tokens_per_s": tokens_per_s, "flops_per_token": flops,
            "model_tflop_per_s": tokens_per_s * flops / 1e12,
            "mfu": tokens_per_s * flops / peak if peak else None,
            "peak_memory_gb": peak_memory_gb(jax.devices()[:1]),
            "loss": float(metrics["loss"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="stop starting new cases after this many seconds")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case (median kept)")
    p.add_argument("--override", action="append", default=[], help="section.field=value")
    p.add_argument("--only", default="", help="run only cases whose name contains one of "
                   "these comma-separated strings (e.g. 'T=32768,1b rope')")
    p.add_argument("--out", default="bench/results/gpu_train.json")
    args = p.parse_args()
    device = jax.devices()[0]
    fallbacks = Fallbacks()
    logging.getLogger("hybridlm.ops.attention").addHandler(fallbacks)
    began, results = time.perf_counter(), []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        out.write_text(json.dumps({
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "card": device.device_kind, "jax": jax.__version__,
            "peak_flops": peak_flops(device), "results": results}, indent=2) + "\n")

    for size, variant, seq_len, batch in CASES:
        name = f"{size} {variant} T={seq_len} B={batch}"
        if not any(part in name for part in args.only.split(",")):
            continue
        if time.perf_counter() - began > args.budget_s:
            results.append({"case": name, "skipped": "time budget spent"})
            print(f"{name}: skipped (budget)", flush=True)
            continue
        seen = len(fallbacks.messages)
        try:
            row = run_case(size, variant, seq_len, batch, args.steps, args.override)
        except Exception as e:  # noqa: BLE001  (out of memory or a kernel error is a result)
            row = {"error": repr(e)[:800]}
        row = {"case": name, **row, "attention_fallbacks": fallbacks.messages[seen:]}
        results.append(row)
        write()
        if "error" in row:
            print(f"{name}: ERROR {row['error'][:300]}", flush=True)
        else:
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
            print(f"{name:32s} step {row['step_s']:.4f} s  {row['tokens_per_s']:>9,.0f} tok/s  "
                  f"{row['model_tflop_per_s']:6.1f} TFLOP/s  MFU {mfu}  "
                  f"mem {row['peak_memory_gb'] or 0:.1f} GB  compile {row['compile_s']:.0f} s"
                  + ("  FELL BACK" if row["attention_fallbacks"] else ""), flush=True)
    write()
    print(f"card: {device.device_kind}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
