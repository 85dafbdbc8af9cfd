"""How fast the data path is, next to what training consumes.

    python bench/data.py                 # table on stdout, JSON in bench/results/data.json
    python bench/data.py --bpe 8192      # also time training an 8k BPE and preparing with it

Measures, on the built-in stdlib corpus in a fresh cache:
  prepare   first-use preparation (read, tokenise, write ArrayRecord shards) in seconds;
  pipeline  batches/s and tokens/s of make_train_iterator per packing and sequence length
            (real tokens: weight-1 positions; padding is reported separately), best of
            --repeats runs of --batches batches after one warm-up batch; the "processes 2"
            rows run 2 OS processes at once, each planning the whole global batch and
            reading its half of the rows (as 2 processes x 4 devices do), and report the
            slower process;
  train     tokens/s of the tiny model's train step (configs/tiny.py, fed by this pipeline),
            the rate the pipeline must beat; --train-steps 0 skips it.
The machine is shared (2 cores here), so numbers are noisy: the best of several runs is kept.
To time another version of the library with this bench, copy bench/data.py and
bench/machine.py into that tree's bench/ and run it from there.
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
                  repeats: int, workers: int = 0, processes: int = 1) -> dict:
    """One process's rate; with processes > 1, that many OS processes at once (each its
    share of the rows of every global batch), and the slowest one's rate."""
    args = dict(cache=str(cache), packing=packing, seq_len=seq_len, batch=batch,
                batches=batches, repeats=repeats, workers=workers)
    if processes > 1:
        children = [subprocess.Popen([sys.executable, __file__, "--child", json.dumps(
            {**args, "process_index": i, "process_count": processes})], text=True,
            stdout=subprocess.PIPE) for i in range(processes)]
        results = [json.loads(c.communicate()[0].splitlines()[-1]) for c in children]
        assert all(c.returncode == 0 for c in children)
        return {**min(results, key=lambda r: r["tokens_per_s"]), "processes": processes}
    return time_share(**args)


def time_share(cache: str, packing: str, seq_len: int, batch: int, batches: int, repeats: int,
               workers: int = 0, process_index: int = 0, process_count: int = 1) -> dict:
    cfg = config_lib.load(None, [f"data.cache_dir={cache}", f"data.packing={packing}",
                                 f"data.seq_len={seq_len}", f"train.batch_size={batch}",
                                 f"data.workers={workers}"])
    best, real, total = float("inf"), 0.0, 0
    for _ in range(repeats):
        it = make_train_iterator(cfg, process_index, process_count, progress=False)
        next(it)  # warm-up: piece table, readers, (worker start-up)
        start = time.perf_counter()
        real = total = 0
        for _ in range(batches):
            b = next(it)
            real += float(b["weights"].sum())
            total += b["weights"].size
        best = min(best, time.perf_counter() - start)
        it.close()
    return {"packing": packing, "seq_len": seq_len, "batch": batch, "workers": workers,
            "processes": process_count, "batches_per_s": round(batches / best, 1),
            "tokens_per_s": round(real / best), "padding": round(1 - real / total, 4)}


def time_training(cache: Path, steps: int) -> dict:
    """Tokens/s of the tiny model's train step on one device, compiled and fed as the
    trainer does (its pipeline, put_batch)."""
    import jax

    from hybridlm.model import abstract_model
    from hybridlm.parallel import make_mesh, put_batch
    from hybridlm.train.optim import decay_mask, make_optimizer
    from hybridlm.train.state import init_state, make_layout
    from hybridlm.train.trainer import compile_train_step

    cfg = config_lib.load(None, [f"data.cache_dir={cache}"])
    mesh = make_mesh({"data": 1, "fsdp": 1, "context": 1, "tensor": 1}, jax.devices()[:1])
    model_cfg = config_lib.model_dict(cfg)
    graphdef, meta = abstract_model(model_cfg, cfg.train.seed)
    tx = make_optimizer(cfg.train, decay_mask(meta))
    layout = make_layout(graphdef, meta, tx, mesh)
    state = init_state(model_cfg, tx, layout, cfg.train.seed)
    step = compile_train_step(cfg, mesh, layout, tx)
    it, rows = make_train_iterator(cfg, progress=False), cfg.train.batch_size
    state, metrics = step(state, put_batch(next(it), mesh, rows))
    jax.block_until_ready(metrics)
    start, tokens = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(it)
        tokens += batch["inputs"].size
        state, metrics = step(state, put_batch(batch, mesh, rows))
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    it.close()
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
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one process of a multi-process row
    args = parser.parse_args()
    if args.child:
        print(json.dumps(time_share(**json.loads(args.child))))
        return

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
        runs += [time_pipeline(cache, packing, seq, batch, args.batches, args.repeats,
                               processes=2)
                 for packing, seq, batch in [("first_fit", 512, 4), ("first_fit", 8192, 8)]]
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
    print(f"{'packing':>10} {'seq':>5} {'batch':>5} {'workers':>7} {'procs':>5} "
          f"{'batches/s':>9} {'tokens/s':>10} {'padding':>7} {'x training':>10}")
    for r in runs:
        # a process must deliver its share of the rows at training's rate
        ratio = (f"{r['tokens_per_s'] * r['processes'] / target:.0f}x" if target else "-")
        print(f"{r['packing']:>10} {r['seq_len']:>5} {r['batch']:>5} {r['workers']:>7} "
              f"{r['processes']:>5} {r['batches_per_s']:>9} {r['tokens_per_s']:>10,} "
              f"{r['padding']:>7.2%} {ratio:>10}")
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
