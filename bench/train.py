"""Training throughput on this machine: step time, tokens/s, model FLOP/s, host overhead.

    python bench/train.py                          # every case; JSON to bench/results/
    python bench/train.py --cases reference --repeats 5 --steps 3
    python bench/train.py --override model.remat=full --override model.attention_impl=dense
    python bench/train.py --peer      # also time a plain Flax NNX model on this machine now

Cases (the model is configs/paper.py at size=tiny with an 8192-token vocabulary:
d_model 256, 4 layers, 4 heads of 64, MLP 1024, float32):
  reference     full causal RoPE attention, seq 1024, batch 4: the config the peers ran
  rnope_swa_1k  3 window-1024 RoPE layers : 1 NoPE full layer, seq 1024, batch 4
  rnope_swa_8k  the same at seq 8192, batch 1

Per case the compiled train step (the trainer's, on one device) runs `steps` steps twice:
  device  with one batch already on the device: the compiled computation alone
  loop    as the trainer runs it: next batch from the data pipeline, placement, dispatch
Each is repeated `repeats` times and the minimum taken (the machine may be shared).
Before each repeat a 2048^3 float32 matmul is timed: model FLOP/s as a fraction of it
says how well the step uses the machine whatever else runs (the peers reached ~0.22:
~90 GFLOP/s against ~400 on a quiet machine).
`--peer` times bench/peer_nnx.py, a plain Flax NNX model of the peers' kind, at the same
shape right after each case, in a fresh process with glibc's default malloc (as the peers
run) and, when this run has huge pages (hybridlm/hugepages.py), again with them (full
causal attention at 8192 too, as MaxText ran it), so the comparison does not depend on how
fast the machine happens to be today.
Host overhead per step: the time the loop's Python side spends per step (fetching and
placing the batch, dispatching the step; the computation itself runs asynchronously),
measured directly, and loop - device, which says the same within the timing noise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from hybridlm import hugepages  # noqa: E402

if __name__ == "__main__":  # as `hybridlm` runs: huge pages (HYBRIDLM_HUGE_PAGES=0: off)
    hugepages.reexec([str(Path(__file__).resolve()), *sys.argv[1:]])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from machine import cpu_name, git_commit  # noqa: E402  (bench/machine.py)

from hybridlm import config as config_lib  # noqa: E402
from hybridlm.data.pipeline import make_train_iterator  # noqa: E402
from hybridlm.model import abstract_model, flops_per_token  # noqa: E402
from hybridlm.parallel import make_mesh, put_batch  # noqa: E402
from hybridlm.train.optim import decay_mask, make_optimizer  # noqa: E402
from hybridlm.train.state import init_state, make_layout  # noqa: E402
from hybridlm.train.trainer import compile_train_step  # noqa: E402

CASES = {
    "reference": ("rope", 1024, 4),
    "rnope_swa_1k": ("rnope_swa", 1024, 4),
    "rnope_swa_8k": ("rnope_swa", 8192, 1),
}
# Peers on this machine (STACK_NOTES.md / issue 5): MaxText and levanter ~2.2 s/step on the
# reference config; MaxText's full-attention model at seq 8192, batch 1: 24.3 s/step.
PEER_TOKENS_PER_S = {"reference": 1850.0, "rnope_swa_8k": 337.0}
TARGET_SPEEDUP = {"reference": 2.0, "rnope_swa_8k": 4.0}


def case_config(name: str, overrides: list[str]):
    variant, seq_len, batch = CASES[name]
    return config_lib.load(
        f"configs/paper.py:variant={variant},size=tiny,seq_len={seq_len},window=1024",
        ["model.vocab_size=8192", f"train.batch_size={batch}", "mesh.data=1"] + overrides)


def matmul_gflops() -> float:
    """Calibration: a 2048^3 float32 matmul, best of 5 (how busy the machine is now)."""
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x: x @ x).lower(a).compile()
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def run_case(name: str, overrides: list[str], steps: int, repeats: int) -> dict:
    cfg = case_config(name, overrides)
    model_cfg = cfg.model.to_dict()
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    graphdef, meta = abstract_model(model_cfg)
    tx = make_optimizer(cfg.train, decay_mask(meta))
    layout = make_layout(graphdef, meta, tx, mesh)
    state = init_state(model_cfg, tx, layout)
    start = time.perf_counter()
    step = compile_train_step(cfg, mesh, layout, tx)
    compile_s = time.perf_counter() - start
    batches = make_train_iterator(cfg, 0, 1)
    rows, seq_len = cfg.train.batch_size, cfg.data.seq_len
    fixed = put_batch(next(batches), mesh, rows)
    state, metrics = step(state, fixed)  # warm up
    jax.block_until_ready(metrics)

    device, loop, host, matmul = [], [], [], []
    for _ in range(repeats):
        matmul.append(matmul_gflops())
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, fixed)
        jax.block_until_ready(metrics)
        device.append((time.perf_counter() - start) / steps)

        start, host_s = time.perf_counter(), 0.0
        for _ in range(steps):
            t0 = time.perf_counter()
            state, metrics = step(state, put_batch(next(batches), mesh, rows))
            host_s += time.perf_counter() - t0  # returns once dispatched: the host's part
        jax.block_until_ready(metrics)
        loop.append((time.perf_counter() - start) / steps)
        host.append(host_s / steps)
    step_s, device_s = min(loop), min(device)
    tokens_per_s = rows * seq_len / step_s
    flops = flops_per_token(model_cfg, seq_len)
    peer = PEER_TOKENS_PER_S.get(name)
    return {
        "case": name, "variant": CASES[name][0], "seq_len": seq_len, "batch": rows,
        "overrides": overrides, "compile_s": compile_s, "step_s": step_s,
        "device_step_s": device_s, "tokens_per_s": tokens_per_s,
        "model_gflop_per_s": tokens_per_s * flops / 1e9, "flops_per_token": flops,
        "matmul_gflop_per_s": max(matmul),
        "fraction_of_matmul": tokens_per_s * flops / 1e9 / max(matmul),
        "host_s": min(host), "host_pct": 100 * min(host) / step_s,
        "loop_minus_device_pct": 100 * (step_s - device_s) / step_s,
        "loss": float(metrics["loss"]),
        "peer_tokens_per_s": peer, "speedup_vs_peer": tokens_per_s / peer if peer else None,
        "target_speedup": TARGET_SPEEDUP.get(name), "all_step_s": loop, "all_device_s": device,
    }


PEER_TIMING = """
import json, sys, time
sys.path.insert(0, {bench!r})
import jax
from peer_nnx import make_step
step, state, (inputs, targets) = make_step({seq_len}, {batch})
state, loss = step(state, inputs, targets)
jax.block_until_ready(loss)
times = []
for _ in range({repeats}):
    start = time.perf_counter()
    state, loss = step(state, inputs, targets)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def run_peer(name: str, repeats: int, huge_pages: bool) -> dict:
    """Time bench/peer_nnx.py in a fresh process, with glibc's default malloc (as the peers
    run) or with huge pages (as `hybridlm` runs, hybridlm/hugepages.py)."""
    _, seq_len, batch = CASES[name]
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if huge_pages:
        env["GLIBC_TUNABLES"] = f"{hugepages.TUNABLE}=1"
    code = PEER_TIMING.format(bench=str(ROOT / "bench"), seq_len=seq_len, batch=batch,
                              repeats=repeats)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    times = json.loads(out.strip().splitlines()[-1])
    return {"step_s": min(times), "tokens_per_s": batch * seq_len / min(times),
            "all_step_s": times, "huge_pages": huge_pages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=3, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the min is kept")
    parser.add_argument("--override", action="append", default=[],
                        help="extra config override section.field=value (repeatable)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--note", default="", help="free text stored with the results")
    parser.add_argument("--peer", action="store_true",
                        help="also time the plain Flax NNX model (bench/peer_nnx.py)")
    args = parser.parse_args()

    huge_pages = hugepages.TUNABLE in os.environ.get("GLIBC_TUNABLES", "")
    load_before = os.getloadavg()
    matmul_before = matmul_gflops()
    results = []
    for name in args.cases:
        print(f"running {name} ...", flush=True)
        result = run_case(name, args.override, args.steps, args.repeats)
        if args.peer and name in PEER_TOKENS_PER_S:
            print(f"running the plain Flax NNX model at the {name} shape ...", flush=True)
            result["plain_nnx"] = run_peer(name, args.repeats, huge_pages=False)
            result["speedup_vs_plain_nnx"] = (result["tokens_per_s"]
                                              / result["plain_nnx"]["tokens_per_s"])
            if huge_pages:
                result["plain_nnx_huge_pages"] = run_peer(name, args.repeats, huge_pages=True)
        results.append(result)
    run = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores", "jax": jax.__version__,
        "backend": jax.devices()[0].platform, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "huge_pages": huge_pages,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "matmul_2048_gflop_per_s": [matmul_before, matmul_gflops()],
        "steps": args.steps, "repeats": args.repeats, "note": args.note, "results": results,
    }
    print(f"\n{run['machine']}, jax {run['jax']}, commit {run['commit']}, {run['date']}"
          + (f" ({args.note})" if args.note else ""))
    print(f"load average {load_before[0]:.1f} -> {run['load_average_after'][0]:.1f}; "
          "2048^3 matmul {:.0f} / {:.0f} GFLOP/s (before / after)".format(
              *run["matmul_2048_gflop_per_s"]))
    header = (f"{'case':14s} {'seq':>5s} {'B':>2s} {'step s':>7s} {'tokens/s':>9s} "
              f"{'GFLOP/s':>8s} {'/matmul':>7s} {'host ms':>8s} {'host %':>7s} {'loop-dev':>8s} "
              f"{'vs peer':>8s}")
    print(header + "\n" + "-" * len(header))
    for r in results:
        vs = f"{r['speedup_vs_peer']:.2f}x" if r["speedup_vs_peer"] else "-"
        print(f"{r['case']:14s} {r['seq_len']:5d} {r['batch']:2d} {r['step_s']:7.3f} "
              f"{r['tokens_per_s']:9.0f} {r['model_gflop_per_s']:8.1f} "
              f"{r['fraction_of_matmul']:7.2f} "
              f"{1000 * r['host_s']:8.1f} {r['host_pct']:6.2f}% "
              f"{r['loop_minus_device_pct']:7.1f}% {vs:>8s}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train-{run['date'].replace(':', '')}.json"
    path.write_text(json.dumps(run, indent=2) + "\n")
    for r in results:
        if "plain_nnx" in r:
            print(f"{r['case']}: plain Flax NNX model {r['plain_nnx']['step_s']:.3f} s/step, "
                  f"{r['plain_nnx']['tokens_per_s']:.0f} tokens/s on this machine now; "
                  f"hybridlm is {r['speedup_vs_plain_nnx']:.2f}x faster")
        if "plain_nnx_huge_pages" in r:
            peer = r["plain_nnx_huge_pages"]
            print(f"{r['case']}: the plain model with huge pages too: {peer['step_s']:.3f} "
                  f"s/step; hybridlm is {r['tokens_per_s'] / peer['tokens_per_s']:.2f}x faster")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
