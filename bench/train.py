"""Training throughput on this machine: step time, tokens/s, model FLOP/s, host overhead.

    python bench/train.py                          # every case; JSON to bench/results/
    python bench/train.py --cases reference --repeats 5 --steps 3
    python bench/train.py --override model.remat=full --override model.attention_impl=dense
    python bench/train.py --peer      # also time a plain Flax NNX model on this machine now
    python bench/train.py --peer maxtext --maxtext-python ~/maxtext-venv/bin/python

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
`--peer` (or `--peer nnx`) times bench/peer_nnx.py, a plain Flax NNX model of the peers'
kind (the "nnx stand-in"), at the same shape right after each case, in a fresh process with
glibc's default malloc (as the peers run) and, when this run has huge pages
(hybridlm/hugepages.py), again with them (full causal attention at 8192 too, as MaxText ran
it), so the comparison does not depend on how fast the machine happens to be today.
`--peer maxtext` runs MaxText itself instead (bench/peer_maxtext.py, under MaxText's own
Python from --maxtext-python, $HYBRIDLM_MAXTEXT_PYTHON or ~/maxtext-venv, which
bench/maxtext_setup.sh builds): its pre-training loop on this CPU with the case's config
translated (same shape, batch and AdamW; dense attention on every layer), on documents of
the same corpus, default malloc; the median of its steps >= 2 of --maxtext-steps. Where
MaxText is not installed it says so in one line and times the nnx stand-in instead.
Without --peer the "vs peer" column compares with tokens/s recorded on another day
(STACK_NOTES.md, peer "recorded"). Every ratio names its peer.
Host overhead per step: the time the loop's Python side spends per step (fetching and
placing the batch, dispatching the step; the computation itself runs asynchronously),
measured directly, and loop - device, which says the same within the timing noise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
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
from peer_maxtext import maxtext_settings  # noqa: E402  (bench/peer_maxtext.py)

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
# reference config; MaxText's full-attention model at seq 8192, batch 1: 24.3 s/step. Another
# day's machine: only the peer measured in the same run (--peer) compares like for like.
PEER_TOKENS_PER_S = {"reference": 1850.0, "rnope_swa_8k": 337.0}
PEER_NAMES = {"nnx": "nnx stand-in", "maxtext": "maxtext", None: "recorded"}
MAXTEXT_SETUP = ("build it with `bash bench/maxtext_setup.sh ~/maxtext-venv`, then pass "
                 "--maxtext-python ~/maxtext-venv/bin/python (or set HYBRIDLM_MAXTEXT_PYTHON)")
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
        "loss": float(metrics["loss"]), "peer": PEER_NAMES[None] if peer else None,
        "peer_tokens_per_s": peer, "speedup_vs_peer": tokens_per_s / peer if peer else None,
        "peer_step_s": rows * seq_len / peer if peer else None,
        "recorded_peer_tokens_per_s": peer,
        "target_speedup": TARGET_SPEEDUP.get(name), "all_step_s": loop, "all_device_s": device,
    }


def set_peer(result: dict, peer: str, measured: dict) -> None:
    """The peer measured in this run replaces the recorded one in the "vs peer" ratio."""
    result.update(peer=PEER_NAMES[peer], peer_tokens_per_s=measured["tokens_per_s"],
                  peer_step_s=measured["step_s"],
                  speedup_vs_peer=result["tokens_per_s"] / measured["tokens_per_s"])


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


def run_peer(name: str, overrides: list[str], repeats: int, huge_pages: bool) -> dict:
    """Time bench/peer_nnx.py in a fresh process, with glibc's default malloc (as the peers
    run) or with huge pages (as `hybridlm` runs, hybridlm/hugepages.py)."""
    cfg = case_config(name, overrides)  # its sequence length and batch (the model is fixed)
    seq_len, batch = cfg.data.seq_len, cfg.train.batch_size
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


def has_maxtext(python: str) -> bool:
    """Whether `python` runs and can import maxtext."""
    try:
        return subprocess.run(
            [python, "-c", "import importlib.util as u, sys; "
             "sys.exit(u.find_spec('maxtext') is None)"], capture_output=True).returncode == 0
    except OSError:
        return False


def find_maxtext(given: str) -> str | None:
    """MaxText's Python: `given` (--maxtext-python or $HYBRIDLM_MAXTEXT_PYTHON; exit 2 with
    one line if it cannot import maxtext), else bench/maxtext_setup.sh's default venv, else
    None (not installed: the caller says so and runs the stand-in)."""
    if given:
        if not has_maxtext(given):
            print(f"--maxtext-python / HYBRIDLM_MAXTEXT_PYTHON: {given} cannot import maxtext; "
                  f"{MAXTEXT_SETUP}", file=sys.stderr)
            sys.exit(2)
        return given
    default = Path.home() / "maxtext-venv" / "bin" / "python"
    return str(default) if default.is_file() and has_maxtext(str(default)) else None


def check_maxtext_settings(cases: list[str], overrides: list[str]) -> None:
    """Exit 2 with one line, before anything compiles, if a case's config has a field MaxText's
    llama2 block cannot express (bench/peer_maxtext.py)."""
    for name in cases:
        if name in PEER_TOKENS_PER_S:
            try:
                maxtext_settings(case_config(name, overrides).to_dict())
            except ValueError as e:
                print(f"--peer maxtext, case {name}: {e}", file=sys.stderr)
                sys.exit(2)


def export_documents(cfg, path: Path, tokens: int) -> None:
    """Training documents of this case's corpus, as hybridlm reads them (pieces of at most
    seq_len tokens, shuffled with train.seed), until `tokens`: the peer's input file."""
    import numpy as np

    from hybridlm.data.packing import PieceSource
    from hybridlm.data.pipeline import split_pieces
    from hybridlm.data.prepare import resolve

    tokenizer, sources = resolve(cfg.data, progress=False)
    prepared = sources[0][0]
    pieces = split_pieces(prepared, cfg.data, "train")
    pieces = pieces[np.random.default_rng(cfg.train.seed).permutation(len(pieces))]
    reader, docs, total = PieceSource(prepared, pieces), [], 0
    for i in range(len(pieces)):
        docs.append(reader[i]["inputs"])
        total += len(docs[-1])
        if total >= tokens:
            break
    vocab = cfg.model.vocab_size  # padding: the first id the tokenizer never produces
    pad = tokenizer.vocab_size if tokenizer.vocab_size < vocab else tokenizer.eos_id
    np.savez(path, tokens=np.concatenate(docs).astype(np.int32),
             offsets=np.cumsum([0] + [len(d) for d in docs]), vocab_size=vocab,
             eos_id=tokenizer.eos_id, pad_id=pad)


def run_maxtext(name: str, overrides: list[str], python: str, steps: int) -> dict:
    """MaxText's own training loop at this case's shape (bench/peer_maxtext.py, run by
    MaxText's Python with glibc's default malloc, as MaxText runs); {"error": ...} if it
    fails, so the cases already measured are still written."""
    cfg = case_config(name, overrides)
    work = Path(tempfile.mkdtemp(prefix=f"hybridlm-maxtext-{name}-"))
    (work / "config.json").write_text(json.dumps(cfg.to_dict()))
    export_documents(cfg, work / "documents.npz",
                     2 * (steps + 2) * cfg.train.batch_size * cfg.data.seq_len)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "PYTHONPATH")}
    proc = subprocess.run(
        [python, str(ROOT / "bench" / "peer_maxtext.py"), "--config", str(work / "config.json"),
         "--documents", str(work / "documents.npz"), "--steps", str(steps),
         "--workdir", str(work)],
        env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
        return {"error": f"exit {proc.returncode}; MaxText's log: {work / 'maxtext.log'}"}
    shutil.rmtree(work, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=3, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the min is kept")
    parser.add_argument("--override", action="append", default=[],
                        help="extra config override section.field=value (repeatable)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--note", default="", help="free text stored with the results")
    parser.add_argument("--peer", nargs="?", const="nnx", choices=["nnx", "maxtext"],
                        help="also time a peer at each case's shape: the plain Flax NNX "
                        "stand-in (bench/peer_nnx.py; the default) or MaxText itself")
    parser.add_argument("--maxtext-python", default=os.environ.get("HYBRIDLM_MAXTEXT_PYTHON", ""),
                        help="MaxText's Python for --peer maxtext (bench/maxtext_setup.sh)")
    parser.add_argument("--maxtext-steps", type=int, default=8,
                        help="MaxText steps per case; the median of steps >= 2 is its time")
    args = parser.parse_args()
    if args.peer == "maxtext":
        if args.maxtext_steps < 3:
            parser.error("--maxtext-steps must be at least 3: steps 0 and 1 are not timed")
        args.maxtext_python = find_maxtext(args.maxtext_python)
        if args.maxtext_python is None:
            print(f"--peer maxtext: MaxText is not installed, so the peer is the nnx stand-in "
                  f"(bench/peer_nnx.py); to run MaxText, {MAXTEXT_SETUP}", flush=True)
            args.peer = "nnx"
        else:
            check_maxtext_settings(args.cases, args.override)

    huge_pages = hugepages.TUNABLE in os.environ.get("GLIBC_TUNABLES", "")
    load_before = os.getloadavg()
    matmul_before = matmul_gflops()
    results = []
    for name in args.cases:
        print(f"running {name} ...", flush=True)
        result = run_case(name, args.override, args.steps, args.repeats)
        if args.peer == "nnx" and name in PEER_TOKENS_PER_S:
            print(f"running the plain Flax NNX model at the {name} shape ...", flush=True)
            result["plain_nnx"] = run_peer(name, args.override, args.repeats, huge_pages=False)
            result["speedup_vs_plain_nnx"] = (result["tokens_per_s"]
                                              / result["plain_nnx"]["tokens_per_s"])
            set_peer(result, "nnx", result["plain_nnx"])
            if huge_pages:
                result["plain_nnx_huge_pages"] = run_peer(
                    name, args.override, args.repeats, huge_pages=True)
        if args.peer == "maxtext" and name in PEER_TOKENS_PER_S:
            print(f"running MaxText at the {name} shape ({args.maxtext_steps} steps) ...",
                  flush=True)
            result["maxtext"] = run_maxtext(name, args.override, args.maxtext_python,
                                            args.maxtext_steps)
            if "error" not in result["maxtext"]:
                set_peer(result, "maxtext", result["maxtext"])
        results.append(result)
    run = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores", "jax": jax.__version__,
        "backend": jax.devices()[0].platform, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "huge_pages": huge_pages,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "matmul_2048_gflop_per_s": [matmul_before, matmul_gflops()],
        "steps": args.steps, "repeats": args.repeats, "note": args.note,
        "peer": PEER_NAMES[args.peer], "results": results,
    }
    print(f"\n{run['machine']}, jax {run['jax']}, commit {run['commit']}, {run['date']}"
          + (f" ({args.note})" if args.note else ""))
    print(f"load average {load_before[0]:.1f} -> {run['load_average_after'][0]:.1f}; "
          "2048^3 matmul {:.0f} / {:.0f} GFLOP/s (before / after)".format(
              *run["matmul_2048_gflop_per_s"]))
    header = (f"{'case':14s} {'seq':>5s} {'B':>2s} {'step s':>7s} {'tokens/s':>9s} "
              f"{'GFLOP/s':>8s} {'/matmul':>7s} {'host ms':>8s} {'host %':>7s} {'loop-dev':>8s} "
              f"{'peer':>12s} {'peer s':>7s} {'vs peer':>8s}")
    print(header + "\n" + "-" * len(header))
    for r in results:
        vs = f"{r['speedup_vs_peer']:.2f}x" if r["speedup_vs_peer"] else "-"
        peer_s = f"{r['peer_step_s']:7.2f}" if r["peer_step_s"] else f"{'-':>7s}"
        print(f"{r['case']:14s} {r['seq_len']:5d} {r['batch']:2d} {r['step_s']:7.3f} "
              f"{r['tokens_per_s']:9.0f} {r['model_gflop_per_s']:8.1f} "
              f"{r['fraction_of_matmul']:7.2f} "
              f"{1000 * r['host_s']:8.1f} {r['host_pct']:6.2f}% "
              f"{r['loop_minus_device_pct']:7.1f}% {r['peer'] or '-':>12s} {peer_s} {vs:>8s}")
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
        if "maxtext" in r:
            peer = r["maxtext"]
            print(f"{r['case']}: MaxText failed: {peer['error']}" if "error" in peer else
                  f"{r['case']}: MaxText {peer['maxtext']} {peer['step_s']:.3f} s/step (median "
                  f"of steps >= 2), {peer['tokens_per_s']:.0f} tokens/s on this machine now; "
                  f"hybridlm's tokens/s are {r['speedup_vs_peer']:.2f}x MaxText's")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
