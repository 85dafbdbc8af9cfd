"""Long-context training on this machine: the tiny model from 8k to 128k tokens, rope and
rnope_swa, through the real trainer and data pipeline.

    python bench/long_context.py                     # every (variant, length): ~3 h here
    python bench/long_context.py --variants rnope_swa --lengths 8192 --steps 1   # smoke

Per (variant, length), one fresh process runs `hybridlm train` on
configs/paper.py:size=tiny,window=1024 at batch 1 (the built-in corpus, packed; checkpoints
and evaluation off, a metrics row every step) for --steps steps, so each run's peak RSS is
its own (os.wait4). Reported per run: compile seconds (the trainer's own count), step
seconds (median of the steps after the first), tokens/s, model GFLOP/s (hybridlm.model.flops:
windowed layers counted at their window, full layers at (T + 1) / 2 keys), peak RSS, and
whether it fit (finished, or how it ended). Lengths run in increasing order per variant; a
run whose estimated step time (the previous length's, scaled by the model FLOPs per step)
exceeds --max-step-s is skipped and says so. Before each run a 2048^3 float32 matmul is
timed, to say how busy the machine was. Writes bench/results/long_context-<date>.json and
docs/img/long_context.png, and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from machine import cpu_name, git_commit  # noqa: E402  (bench/machine.py)

from hybridlm import config as config_lib  # noqa: E402
from hybridlm.model import flops_per_token  # noqa: E402

VARIANTS = ("rnope_swa", "rope")
LENGTHS = (8192, 16384, 32768, 65536, 131072)
WINDOW = 1024
COMPILED = re.compile(r"step compiled in ([0-9.]+) s")


def spec(variant: str, length: int) -> str:
    return f"configs/paper.py:variant={variant},size=tiny,seq_len={length},window={WINDOW}"


def model_flops_per_step(variant: str, length: int) -> float:
    """Training FLOPs of one step at batch 1 (the analytic count the trainer's MFU uses)."""
    cfg = config_lib.load(spec(variant, length))
    return flops_per_token(config_lib.model_dict(cfg), length) * length


def matmul_gflops() -> float:
    """A 2048^3 float32 matmul, best of 3, in a fresh process (how busy the machine is)."""
    code = ("import time, jax, jax.numpy as jnp\n"
            "a = jnp.ones((2048, 2048)); f = jax.jit(lambda x: x @ x); f(a).block_until_ready()\n"
            "best = float('inf')\n"
            "for _ in range(3):\n"
            "    s = time.perf_counter(); f(a).block_until_ready()\n"
            "    best = min(best, time.perf_counter() - s)\n"
            "print(2 * 2048**3 / best / 1e9)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else float("nan")


def run_one(variant: str, length: int, steps: int, timeout_s: float) -> dict:
    """One training run in its own process; its own peak RSS from os.wait4."""
    with tempfile.TemporaryDirectory(prefix="long_context_") as workdir:
        argv = [sys.executable, "-m", "hybridlm.cli", "train", "--config", spec(variant, length),
                "--config.train.batch_size=1", f"--config.train.steps={steps}",
                "--config.log.every=1", "--config.eval.steps=0",
                "--config.checkpoint.enabled=False", "--config.mesh.data=1",
                "--workdir", workdir]
        log = Path(workdir) / "stdout.log"
        start = time.perf_counter()
        with log.open("w") as out:
            child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
            timed_out = False
            while True:
                pid, status, usage = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() - start > timeout_s and not timed_out:
                    child.kill()  # wait4 then collects it
                    timed_out = True
                time.sleep(0.5)
            child.returncode = code = os.waitstatus_to_exitcode(status)
        text = log.read_text()
        rows = [json.loads(line) for line in
                (Path(workdir) / "metrics.jsonl").read_text().splitlines()
                ] if (Path(workdir) / "metrics.jsonl").exists() else []
    row = {"variant": variant, "seq_len": length, "window": WINDOW if variant == "rnope_swa"
           else None, "batch": 1, "steps": steps, "wall_s": time.perf_counter() - start,
           "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9, "exit": code}
    compiled = COMPILED.search(text)
    row["compile_s"] = float(compiled.group(1)) if compiled else None
    times = [r["step_time_s"] for r in rows if "step_time_s" in r]
    if timed_out or code != 0 or len(times) < steps:
        how = (f"timed out after {timeout_s:.0f} s" if timed_out else
               f"killed by signal {-code} (out of memory?)" if code < 0
               else f"exit {code}: {text.strip().splitlines()[-1:]}")
        return {**row, "fit": False, "ended": how}
    step_s = statistics.median(times[1:] or times)
    flops = model_flops_per_step(variant, length)
    return {**row, "fit": True, "step_s": step_s, "all_step_s": times,
            "tokens_per_s": length / step_s, "model_flops_per_step": flops,
            "model_gflop_per_s": flops / step_s / 1e9, "loss": rows[-1].get("loss")}


def table(results: list[dict]) -> str:
    lines = ["| variant | T | compile s | step s | tokens/s | model GFLOP/s | peak RSS | fit |",
             "|---|---|---|---|---|---|---|---|"]
    def num(r, key, fmt):
        return format(r[key], fmt) if r.get(key) is not None else "-"

    for r in results:
        fit = "yes" if r.get("fit") else r.get("ended") or r.get("skipped", "no")
        lines.append(f"| {r['variant']} | {r['seq_len']} | {num(r, 'compile_s', '.1f')} | "
                     f"{num(r, 'step_s', '.1f')} | {num(r, 'tokens_per_s', '.0f')} | "
                     f"{num(r, 'model_gflop_per_s', '.1f')} | "
                     f"{num(r, 'peak_rss_gb', '.1f')} GB | {fit} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("compile_s", "compile (s)"), ("model_gflop_per_s", "model GFLOP/s"),
              ("peak_rss_gb", "peak RSS (GB)"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for variant in VARIANTS:
            points = [(r["seq_len"], r[key]) for r in results
                      if r["variant"] == variant and r.get("fit") and r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)  # flat reads flat: a 9.0 -> 9.6 s compile is not a climb
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    p.add_argument("--steps", type=int, default=3, help="training steps per run")
    p.add_argument("--max-step-s", type=float, default=1500.0,
                   help="skip a run whose estimated step time exceeds this")
    p.add_argument("--timeout-s", type=float, default=7200.0, help="per run")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "img" / "long_context.png"))
    args = p.parse_args()
    lengths = sorted(int(x) for x in args.lengths.split(","))
    results = []
    for variant in args.variants.split(","):
        previous, stop = None, None
        for length in lengths:
            if previous is not None and stop is None:
                estimate = previous["step_s"] * (model_flops_per_step(variant, length) /
                                                 previous["model_flops_per_step"])
                if estimate > args.max_step_s:
                    stop = f"not run: ~{estimate:.0f} s/step estimated"
            if stop is not None:
                results.append({"variant": variant, "seq_len": length, "fit": None,
                                "skipped": stop})
                print(f"{variant} T={length}: skipped ({stop})", flush=True)
                continue
            busy = matmul_gflops()
            row = {**run_one(variant, length, args.steps, args.timeout_s),
                   "matmul_gflop_per_s": busy}
            results.append(row)
            print(table([row]).splitlines()[-1], flush=True)
            if row["fit"]:
                previous = row
            else:
                stop = f"not run: T={length} did not fit"
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    meta = {"date": stamp, "cpu": cpu_name(), "cores": os.cpu_count(), "commit": git_commit(),
            "model": "configs/paper.py size=tiny, batch 1, window 1024"}
    out = Path(args.out) / f"long_context-{stamp.replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    plot(results, Path(args.plot), f"tiny model, batch 1, {meta['cpu']}, {meta['cores']} "
         f"cores, commit {meta['commit']}, {stamp[:10]}")
    print(table(results))
    print(f"wrote {out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
