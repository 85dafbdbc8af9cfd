"""The paper's 8B shape compiled for v5p slices from this CPU: fits or not, bytes per device,
FLOPs per step, against the analytic count. Writes JSON and the table in docs/scaling.md.

    python bench/scaling.py                                   # the table in docs/scaling.md
    python bench/scaling.py --points rope:131072:v5p:4x4x8    # one point, printed only
    python bench/scaling.py --points rnope_swa:262144:v5p:4x4x8+context=4 --doc ''

Every point is `hybridlm compile` of `configs/paper.py:variant=V,size=8b,seq_len=T` (`--size`
for another) with
bfloat16 activations, full rematerialisation, AdamW, fully sharded data parallelism over
the whole slice (mesh.data=1, mesh.fsdp=-1) and one sequence per device; a point ending
in `+context=N` splits each sequence over N devices (mesh.context=N, one sequence per N
devices, fsdp over the rest). Needs libtpu
(`pip install 'hybridlm[tpu]'`); each point compiles in a subprocess (libtpu's compiler
keeps memory between compiles).
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
DEFAULT_POINTS = [f"{v}:{t}:{topo}" for t, topo in (
    (8192, "v5p:4x4x4"), (32768, "v5p:4x4x4"), (131072, "v5p:4x4x4"), (131072, "v5p:4x4x8"))
    for v in ("rope", "rnope_swa")]
BEGIN, END = "<!-- scaling table: begin -->", "<!-- scaling table: end -->"
GIB = 2**30


def compile_point(variant: str, seq_len: int, topology: str, remat: str, mfu: float,
                  context: int = 1, size: str = "8b") -> dict:
    """One compile in this process; returns the report as a dict."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    from hybridlm import config as config_lib
    from hybridlm.train import aot

    topo = aot.parse_topology(topology)
    devices = aot.tpu_devices(topo)
    cfg = config_lib.load(f"configs/paper.py:variant={variant},size={size},seq_len={seq_len}", [
        "model.dtype=bfloat16", f"model.remat={remat}", "mesh.data=1", "mesh.fsdp=-1",
        f"mesh.context={context}", f"train.batch_size={len(devices) // context}",
        "model.attention_block_q=512", "model.attention_block_kv=512"])
    start = time.perf_counter()
    report = aot.compile_for(cfg, topo, mfu=mfu, devices=devices)
    out = report.as_dict(topo.peak_flops_per_chip)
    out.update(variant=variant, size=size, compile_s=time.perf_counter() - start)
    return out


def parse_point(point: str) -> tuple[str, int, str, int]:
    """'variant:seq_len:topology[+context=N]' -> (variant, seq_len, topology, context)."""
    base, _, option = point.partition("+context=")
    variant, seq_len, topology = base.split(":", 2)
    return variant, int(seq_len), topology, int(option or 1)


def run_point(point: str, remat: str, mfu: float, size: str = "8b") -> dict:
    variant, seq_len, topology, _ = parse_point(point)
    cmd = [sys.executable, __file__, "--_one", point, "--remat", remat, "--mfu", str(mfu),
           "--size", size]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "localhost"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-3:]
        return {"variant": variant, "seq_len": seq_len, "topology": topology,
                "error": " / ".join(tail)}
    return json.loads(result.stdout.strip().splitlines()[-1])


def row(r: dict) -> str:
    if "error" in r:
        return f"| {r['variant']} | {r['seq_len'] // 1024}k | {r['topology']} | error: " \
               f"{r['error'][:120]} |" + " |" * 8
    g = lambda b: f"{b / GIB:.1f}"
    star = "" if r.get("compiled", True) else "*"  # the compiler stopped: its out-of-HBM figure
    context = r["mesh"].get("context", 1)
    split = f", context {context}" if context > 1 else ""
    return (f"| {r['variant']} | {r['seq_len'] // 1024}k | {r['topology']} ({r['devices']}"
            f"{split}) "
            f"| {'yes' if r['fits'] else '**no**'} | {g(r['param_bytes'] + r['opt_bytes'])} "
            f"| {g(r['temp_bytes'])}{star} | {g(r['peak_bytes'])}{star} / {g(r['hbm_bytes'])} "
            f"| {r['analytic_flops_per_step'] / 1e15:.1f} "
            f"| {xla_flops(r)} "
            f"| {r['kernel_flops_per_step'] / 1e15:.2f} "
            f"| {r['step_time_s']:.2f} | {r['compile_s']:.0f} |")


def xla_flops(r: dict) -> str:
    if not r.get("compiled", True):
        return "-"
    return f"{r['xla_flops_per_device'] * r['devices'] / 1e15:.1f}"


HEADER = ("| variant | T | slice (devices) | fits | state GiB | activations GiB "
          "| total / HBM GiB | PFLOPs/step analytic | XLA PFLOPs/step (loop body once) "
          "| splash PFLOPs/step (block map) | step s at MFU | compile s |\n|" + "---|" * 12)


def attention_flops(r: dict) -> float:
    from hybridlm import config as config_lib
    from hybridlm.model.flops import attention_flops_per_token

    cfg = config_lib.load(f"configs/paper.py:variant={r['variant']},size={r.get('size', '8b')},"
                          f"seq_len={r['seq_len']}")
    return attention_flops_per_token(config_lib.model_dict(cfg), r["seq_len"]) * \
        r["tokens_per_step"]


def comparisons(results: list[dict]) -> list[str]:
    """rnope_swa against rope at the same length and slice: measured and analytic ratios."""
    lines = []
    by_key = {(r["variant"], r["seq_len"], r["topology"], r["mesh"]["context"]): r
              for r in results if "error" not in r}
    for (variant, seq_len, topology, context), swa in sorted(by_key.items()):
        rope = by_key.get(("rope", seq_len, topology, context))
        if variant != "rnope_swa" or rope is None:
            continue
        ratio = lambda key, swa=swa, rope=rope: swa[key] / rope[key]
        both = swa.get("compiled", True) and rope.get("compiled", True)
        lines.append(
            f"- {seq_len // 1024}k on {topology}"
            + (f" (context {context})" if context > 1 else "")
            + ", rnope_swa / rope: attention FLOPs "
            f"{ratio('kernel_flops_per_step'):.3f} in splash's block map vs "
            f"{attention_flops(swa) / attention_flops(rope):.3f} analytic; step FLOPs "
            f"{ratio('analytic_flops_per_step'):.3f} analytic; XLA's FLOPs outside the kernel "
            + (f"{ratio('xla_flops_per_device'):.3f}" if both else "- (not compiled)")
            + f"; activation bytes {ratio('temp_bytes'):.3f}; "
            f"total bytes per device {ratio('peak_bytes'):.3f}")
    return lines


def write_doc(doc: Path, table: str) -> None:
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} lacks the markers {BEGIN} ... {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default=",".join(DEFAULT_POINTS),
                        help="comma-separated variant:seq_len:topology")
    parser.add_argument("--remat", default="full")
    parser.add_argument("--size", default="8b", help="configs/paper.py size (default: 8b)")
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--out", default=str(ROOT / "bench/results/scaling.json"))
    parser.add_argument("--doc", default=str(ROOT / "docs/scaling.md"),
                        help="rewrite the table between the markers here ('' = do not)")
    parser.add_argument("--collect", default=None,
                        help="comma-separated JSON files of earlier runs: merge them into "
                        "--out and the doc instead of compiling")
    parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:  # the subprocess: one compile, JSON on the last line
        variant, seq_len, topology, context = parse_point(args._one)
        print(json.dumps(compile_point(variant, seq_len, topology, args.remat, args.mfu,
                                       context, args.size)))
        return
    points = args.points.split(",")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    meta = {"date": datetime.date.today().isoformat(), "commit": commit, "remat": args.remat,
            "size": args.size,
            "mfu": args.mfu, "machine": f"{os.cpu_count()}-core CPU, libtpu compile only"}
    results, start = [], time.perf_counter()
    if args.collect:
        runs = [json.loads(Path(f).read_text()) for f in args.collect.split(",")]
        results = [r for run in runs for r in run["results"]]
        points = []
        meta.update(commit=",".join(sorted({run["commit"] for run in runs})))
        args.points = ",".join(f"{r['variant']}:{r['seq_len']}:{r['topology']}" for r in results)
    print(HEADER, flush=True)
    for i, point in enumerate(points):
        results.append(run_point(point, args.remat, args.mfu, args.size))
        print(row(results[-1]), flush=True)
        elapsed = time.perf_counter() - start
        print(f"  [{i + 1}/{len(points)}] {elapsed:.0f} s, ETA "
              f"{elapsed / (i + 1) * (len(points) - i - 1):.0f} s", file=sys.stderr, flush=True)
        if args.out:  # after every point: a long sweep keeps what it has
            Path(args.out).write_text(json.dumps({**meta, "results": results}, indent=1) + "\n")
    if args.out and args.collect:
        Path(args.out).write_text(json.dumps({**meta, "results": results}, indent=1) + "\n")
    lines = comparisons(results)
    print("\n".join(lines))
    if args.doc:
        table = "\n".join([f"Generated by `python bench/scaling.py --points {args.points}` on "
                           f"{meta['date']} at commit {meta['commit']} (remat {args.remat}, "
                           f"step time at {args.mfu:.0%} MFU). `*`: the TPU compiler stopped "
                           "with out-of-HBM; bytes are its own figure for the temporaries "
                           "plus the state from the sharding layout.", "", HEADER,
                           *map(row, results), "", *lines])
        write_doc(Path(args.doc), table)

if __name__ == "__main__":
    main()
