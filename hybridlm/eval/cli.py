"""`hybridlm eval`, `hybridlm analyze` and `hybridlm generate`: a trained run's model.

The parsers and the glue from flags to `hybridlm.eval.commands` (the bodies, functions of
(cfg, model)). The model is restored onto the evaluation mesh (`placement.py`); only
`--config.mesh.*` overrides are taken. Like `train`, each command joins a multi-process job
(`--coordinator/--num_processes/--process_id`, or SLURM / TPU-pod variables) after its
arguments are checked and before anything touches a device; every process computes, and
process 0 alone prints and writes the results.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from hybridlm.parallel import distributed


def _numbers(kind: type, what: str):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    return parse


_ints = _numbers(int, "a token count (or comma-separated counts)")
_floats = _numbers(float, "a fraction (or comma-separated fractions)")


def _tasks(text: str) -> str:
    known = ("niah", "ruler", "ppl", "all")
    if not text or any(t not in known for t in text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(known)} (several "
                                         "comma-separated)")
    return text


def _flatten(groups: list[list] | None) -> list | None:
    return None if groups is None else [x for g in groups for x in g]


def add_parsers(sub) -> None:
    def common(p, lengths_help):
        p.add_argument("--workdir", required=True,
                       help="a training run's workdir (its latest checkpoint) or a params export")
        p.add_argument("--step", type=int, default=None,
                       help="evaluate this checkpoint step instead of the latest")
        p.add_argument("--lengths", type=_ints, nargs="+", default=None, help=lengths_help)
        p.add_argument("--samples", type=int, default=None,
                       help="samples per cell (ppl: documents per length)")
        p.add_argument("--seed", type=int, default=0, help="seed of the synthetic samples")
        p.add_argument("--out", default=None, help="results directory (default WORKDIR/eval)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        distributed.add_cli_flags(p)

    lengths_help = ("context lengths in tokens, space or comma separated (default: 1x, 2x, 4x "
                    "the trained data.seq_len)")
    ev = sub.add_parser(
        "eval", help="long-context evaluation: needles, RULER-style tasks, loss by position",
        description="Evaluate a trained run. niah: single-needle grid of lengths x depths "
        "(exact match, heatmap); ruler: six RULER-style tasks per length; ppl: held-out loss "
        "by position. Results: WORKDIR/eval/<task>.json (with a 'summary') and <task>.png.")
    ev.add_argument("--task", type=_tasks, default="niah",
                    help="niah, ruler, ppl or all; several comma-separated (default niah)")
    common(ev, lengths_help)
    ev.add_argument("--depths", type=_floats, nargs="+", default=None,
                    help="needle depths in [0, 1] (default niah 0,.25,.5,.75,1; ruler .1,.5,.9)")
    an = sub.add_parser(
        "analyze", help="the paper's attention analysis: where the question tokens look",
        description="Needle at 50% depth; attention mass of the question+answer tokens on "
        "the first 10 tokens, the needle, the rest of the context and themselves, plus "
        "entropy, per layer, per layer type and overall. Writes WORKDIR/eval/analysis.json, "
        "analysis.md (tables) and analysis.png.")
    common(an, lengths_help)
    gen = sub.add_parser(
        "generate", help="continue a prompt with the hybrid KV cache",
        description="Continue --prompt (greedy by default) and report the KV cache's size "
        "next to a full-attention cache of the same model.")
    gen.add_argument("--workdir", required=True, help="a training run's workdir or an export")
    gen.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max_new", type=int, default=64, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top_k", type=int, default=0, help="sample from the k likeliest (0: all)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    distributed.add_cli_flags(gen)


def _load_run(args: argparse.Namespace, overrides: list[str]):
    """(config, model, step, mesh) of a run's checkpoint or a params export, the parameters
    restored into their shards on the evaluation mesh (hybridlm/eval/placement.py).

    Mistakes are reported before the processes join; the processes then check that they
    run the same command on the same checkpoint (distributed.preflight) before any restore."""
    from hybridlm.errors import CheckpointError, UserError
    from hybridlm.eval import placement
    from hybridlm.runs import find_sources, load_model

    placement.check_overrides(overrides)
    path = Path(args.workdir)
    if not path.exists():
        raise UserError(f"--workdir {path} does not exist; pass a training run's workdir")
    newest = find_sources(path, args.step)[0]
    joined = distributed.start(args, _invocation(args, overrides, newest),
                               what="command or checkpoint")
    meshes = []

    def mesh_for(cfg):
        meshes.append(placement.eval_mesh(cfg, overrides))
        return meshes[-1]

    try:
        cfg, model, step = load_model(path, args.step, mesh_for=mesh_for)
    except (FileNotFoundError, CheckpointError) as e:
        raise UserError(f"--workdir {path}: {e}") from None
    mesh = meshes[-1]
    processes = f", {joined.num_processes} processes" if joined.num_processes > 1 else ""
    print(f"loaded {path} at step {step} on the {placement.describe(mesh)}{processes}",
          file=sys.stderr, flush=True)
    return cfg, model, step, mesh


def _invocation(args: argparse.Namespace, overrides: list[str], source) -> str:
    """What every process of a job must agree on: the command, its flags (all but the
    process id) and the checkpoint it would read (a workdir not on a shared filesystem, or
    a checkpoint still being written, shows up here)."""
    flags = {k: v for k, v in sorted(vars(args).items()) if k != "process_id"}
    return json.dumps({"flags": flags, "overrides": overrides, "step": source.step,
                       "checkpoint": str(source.directory),
                       "config": source.config.to_dict()}, sort_keys=True, default=str)


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def _done() -> int:
    """Every process leaves together, once process 0 has written and printed: a process that
    exits early waits in JAX's shutdown barrier, which gives up after 5 minutes."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("hybridlm: results written")
    return 0


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from hybridlm.eval import commands
    from hybridlm.eval.placement import on_mesh

    lengths, depths = _flatten(args.lengths), _flatten(args.depths)
    commands.check_grid(lengths or [commands.MIN_LENGTH], depths or (),
                        1 if args.samples is None else args.samples)
    cfg, model, step, mesh = _load_run(args, overrides)
    out = Path(args.out) if args.out else Path(args.workdir) / "eval"
    with on_mesh(mesh, cfg):
        results = commands.run_eval(cfg, model, out, args.task, lengths=lengths, depths=depths,
                                    samples=args.samples, seed=args.seed, step=step,
                                    progress=not args.quiet and _is_main())
    if _is_main():
        print(eval_summary(results, out, args.workdir, step), flush=True)
    return _done()


def eval_summary(results: dict[str, dict], out: Path, workdir: str, step: int) -> str:
    """What `hybridlm eval` made: each task's summary scores, its files, and what next."""
    lines = []
    for name, result in results.items():
        lines.append(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in
                                             result["summary"].items() if v is not None))
    lines.append(f"evaluated step {step} of {workdir}; results in {out}/:")
    lines += [f"  {out / (name + ext)}" for name in results for ext in (".json", ".png")]
    w = shlex.quote(str(workdir))
    lines += ["next:", f"  hybridlm analyze --workdir {w}     # where the attention looks",
              f"  hybridlm generate --workdir {w} --prompt TEXT"]
    return "\n".join(lines)


def cmd_analyze(args: argparse.Namespace, overrides: list[str]) -> int:
    from hybridlm.eval import commands
    from hybridlm.eval.placement import on_mesh

    lengths = _flatten(args.lengths)
    commands.check_grid(lengths or [commands.MIN_LENGTH], (),
                        1 if args.samples is None else args.samples)
    cfg, model, step, mesh = _load_run(args, overrides)
    out = Path(args.out) if args.out else Path(args.workdir) / "eval"
    with on_mesh(mesh, cfg):
        result = commands.run_analysis(
            cfg, model, out, lengths=lengths, seed=args.seed, step=step,
            progress=not args.quiet and _is_main(),
            samples=commands.DEFAULT_SAMPLES["analyze"] if args.samples is None
            else args.samples)
    if _is_main():
        print(commands.analysis_markdown(result))
        print(f"wrote {out / 'analysis.json'}, {out / 'analysis.md'} and "
              f"{out / 'analysis.png'}")
    return _done()


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from hybridlm.eval import commands
    from hybridlm.eval.placement import on_mesh

    cfg, model, _, mesh = _load_run(args, overrides)
    with on_mesh(mesh, cfg):
        r = commands.generate_text(cfg, model, args.prompt, max_new=args.max_new,
                                   temperature=args.temperature, top_k=args.top_k,
                                   seed=args.seed)
    if _is_main():
        print(r["prompt"] + r["text"])
        for label, c in ((f"{r['max_len']} tokens", r["cache"]),
                         ("128k tokens", r["cache_128k"])):
            print(f"KV cache at {label}: {c['hybrid_bytes'] / 2**20:.2f} MiB, full attention "
                  f"{c['full_bytes'] / 2**20:.2f} MiB ({c['fraction']:.1%} of it)")
    return _done()


COMMANDS = {"eval": cmd_eval, "analyze": cmd_analyze, "generate": cmd_generate}
