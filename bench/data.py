"""How fast the data path is, next to what training consumes.

    python bench/data.py                 # table on stdout, JSON in bench/results/data.json
    python bench/data.py --bpe 8192      # also time training an 8k BPE and preparing with it

Measures, on the built-in stdlib corpus in a fresh cache:
  prepare   first-use preparation (read, tokenise, write ArrayRecord shards) in seconds;
  pipeline  batches/s and tokens/s of make_train_iterator per packing and sequence length
            (real tokens: weight-1 positions; padding is reported separately), best of
            --repeats runs of --batches batches after one warm-up batch;
  train     tokens/s of the tiny model's train step (configs/tiny.py, fed by this pipeline),
            the rate the pipeline must beat; --train-steps 0 skips it.
The machine is shared (2 cores here), so numbers are noisy: the best of several runs is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import cpu_name  # noqa: E402  (bench/machine.py)

from hybridlm import config as config_lib  # noqa: E402
from hybridlm.data import prepare  # noqa: E402
from hybridlm.data.pipeline import make_train_iterator  # noqa: E402


def time_prepare(cache: Path, tokenizer: str) -> dict:
    cfg = config_lib.load(None, [f"data.cache_dir={cache}", f"data.tokenizer={tokenizer}",
                                 "model.vocab_size=65536"])
    start = time.perf_counter()
    _, [(prepared, _)] = prepare.resolve(cfg.data, progress=False)
    m = prepared.manifest
    return {"tokenizer": tokenizer, "seconds": round(time.perf_counter() - start, 2),
            "prepare_seconds": m["seconds"], "files": m["files"], "documents": m["documents"],
            "tokens": m["tokens"], "longest": m["longest"],
            "docs_over_8k_tokens": int((prepared.lengths > 8192).sum())}


def time_pipeline(cache: Path, packing: str, seq_len: int, batch: int, batches: int,
                  repeats: int, workers: int = 0) -> dict:
    cfg = config_lib.load(None, [f"data.cache_dir={cache}", f"data.packing={packing}",
                                 f"data.seq_len={seq_len}", f"train.batch_size={batch}",
                                 f"data.workers={workers}"])
    best, real, total = float("inf"), 0.0, 0
    for _ in range(repeats):
        it = make_train_iterator(cfg, progress=False)
        next(it)  # warm-up: piece table, readers, (worker start-up)
        start = time.perf_counter()
        real = total = 0
        for _ in range(batches):
            b = next(it)
            real += float(b["weights"].sum())
            total += b["weights"].size
        best = min(best, time.perf_counter() - start)
        if workers:
            it.close()
    return {"packing": packing, "seq_len": seq_len, "batch": batch, "workers": workers,
            "batches_per_s": round(batches / best, 1), "tokens_per_s": round(real / best),
            "padding": round(1 - real / total, 4)}


def time_training(cache: Path, steps: int) -> dict:
    """Tokens/s of the tiny model's train step, fed by the pipeline (foundation step API)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from hybridlm.model import Transformer
    from hybridlm.train.optim import make_optimizer
    from hybridlm.train.step import make_train_step

    cfg = config_lib.load(None, [f"data.cache_dir={cache}"])
    it = make_train_iterator(cfg, progress=False)
    model = Transformer(config_lib.model_dict(cfg), rngs=nnx.Rngs(params=0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(cfg.train)
    state = (params, tx.init(params))
    step = jax.jit(make_train_step(graphdef, tx), donate_argnums=0)
    state, metrics = step(state, {k: jnp.asarray(v) for k, v in next(it).items()})
    jax.block_until_ready(metrics)
    start, tokens = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(it)
        tokens += batch["inputs"].size
        state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    return {"config": "configs/tiny.py", "seq_len": cfg.data.seq_len,
            "batch": cfg.train.batch_size, "steps": steps,
            "step_time_s": round(seconds / steps, 3), "tokens_per_s": round(tokens / seconds),
            "loss": float(metrics["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--bpe", type=int, default=0, help="also time a BPE of this size")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        prepared = [time_prepare(cache, "byte")]
        if args.bpe:
            prepared.append(time_prepare(cache, f"bpe:{args.bpe}"))
        runs = [time_pipeline(cache, packing, seq, batch, args.batches, args.repeats)
                for packing, seq, batch in [("first_fit", 512, 4), ("concat", 512, 4),
                                            ("best_fit", 512, 4), ("first_fit", 2048, 8),
                                            ("first_fit", 8192, 8), ("concat", 8192, 8)]]
        runs.append(time_pipeline(cache, "first_fit", 512, 4, args.batches, 1, workers=1))
        train = time_training(cache, args.train_steps) if args.train_steps else None

    print("\nprepare (fresh cache)")
    print(f"{'tokenizer':>10} {'seconds':>8} {'files':>6} {'docs':>6} {'tokens':>12} "
          f"{'longest':>8} {'>8k':>5}")
    for p in prepared:
        print(f"{p['tokenizer']:>10} {p['seconds']:>8} {p['files']:>6} {p['documents']:>6} "
              f"{p['tokens']:>12,} {p['longest']:>8,} {p['docs_over_8k_tokens']:>5}")
    target = train["tokens_per_s"] if train else None
    print(f"\npipeline (best of {args.repeats} x {args.batches} batches)"
          + (f"; tiny training consumes {target:,} tokens/s" if target else ""))
    print(f"{'packing':>10} {'seq':>5} {'batch':>5} {'workers':>7} {'batches/s':>9} "
          f"{'tokens/s':>10} {'padding':>7} {'x training':>10}")
    for r in runs:
        ratio = f"{r['tokens_per_s'] / target:.0f}x" if target else "-"
        print(f"{r['packing']:>10} {r['seq_len']:>5} {r['batch']:>5} {r['workers']:>7} "
              f"{r['batches_per_s']:>9} {r['tokens_per_s']:>10,} {r['padding']:>7.2%} "
              f"{ratio:>10}")
    if train:
        print(f"\ntrain: {train['step_time_s']} s/step, {train['tokens_per_s']:,} tokens/s "
              f"(tiny, seq {train['seq_len']}, batch {train['batch']})")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    result = {"machine": f"{cpu_name()}, {os.cpu_count()} cores",
              "load_average_1m": round(os.getloadavg()[0], 2), "commit": commit,
              "date": time.strftime("%Y-%m-%d"), "prepare": prepared, "pipeline": runs,
              "train": train}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":  # worker processes (data.workers) re-import this module
    main()
