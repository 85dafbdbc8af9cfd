"""`hybridlm eval`, `hybridlm analyze` and `hybridlm generate`: a trained run's model.

The parsers and the glue from flags to `hybridlm.eval.commands` (the bodies, functions of
(cfg, model)). The model is restored onto the evaluation mesh (`placement.py`); only
`--config.mesh.*` overrides are taken.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _numbers(kind: type, what: str):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    return parse


_ints = _numbers(int, "a token count (or comma-separated counts)")
_floats = _numbers(float, "a fraction (or comma-separated fractions)")


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

    lengths_help = ("context lengths in tokens, space or comma separated (default: 1x, 2x, 4x "
                    "the trained data.seq_len)")
    ev = sub.add_parser(
        "eval", help="long-context evaluation: needles, RULER-style tasks, loss by position",
        description="Evaluate a trained run. niah: single-needle grid of lengths x depths "
        "(exact match, heatmap); ruler: six RULER-style tasks per length; ppl: held-out loss "
        "by position. Results: WORKDIR/eval/<task>.json (with a 'summary') and <task>.png.")
    ev.add_argument("--task", choices=("niah", "ruler", "ppl", "all"), default="niah")
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


def _load_run(workdir: str, step: int | None, overrides: list[str]):
    """(config, model, step, mesh) of a run's checkpoint or a params export, the parameters
    restored into their shards on the evaluation mesh (hybridlm/eval/placement.py)."""
    from hybridlm.eval import placement

    placement.check_overrides(overrides)
    from hybridlm.errors import UserError

    path = Path(workdir)
    if not path.exists():
        raise UserError(f"--workdir {path} does not exist; pass a training run's workdir")
    from hybridlm.train.checkpoint import CheckpointError, load_model

    meshes = []

    def mesh_for(cfg):
        meshes.append(placement.eval_mesh(cfg, overrides))
        return meshes[-1]

    try:
        cfg, model, step = load_model(path, step, mesh_for=mesh_for)
    except (FileNotFoundError, CheckpointError) as e:
        raise UserError(f"--workdir {path}: {e}") from None
    mesh = meshes[-1]
    print(f"loaded {path} at step {step} on the {placement.describe(mesh)}", file=sys.stderr,
          flush=True)
    return cfg, model, step, mesh


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from hybridlm.eval import commands
    from hybridlm.eval.placement import on_mesh

    lengths, depths = _flatten(args.lengths), _flatten(args.depths)
    commands.check_grid(lengths or [commands.MIN_LENGTH], depths or (),
                        1 if args.samples is None else args.samples)
    cfg, model, step, mesh = _load_run(args.workdir, args.step, overrides)
    out = Path(args.out) if args.out else Path(args.workdir) / "eval"
    with on_mesh(mesh, cfg):
        results = commands.run_eval(cfg, model, out, args.task, lengths=lengths, depths=depths,
                                    samples=args.samples, seed=args.seed, step=step,
                                    progress=not args.quiet)
    for name, result in results.items():
        print(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in result["summary"].items()
                                       if v is not None))
        print(f"  wrote {out / (name + '.json')} and {out / (name + '.png')}")
    return 0


def cmd_analyze(args: argparse.Namespace, overrides: list[str]) -> int:
    from hybridlm.eval import commands
    from hybridlm.eval.placement import on_mesh

    lengths = _flatten(args.lengths)
    commands.check_grid(lengths or [commands.MIN_LENGTH], (),
                        1 if args.samples is None else args.samples)
    cfg, model, step, mesh = _load_run(args.workdir, args.step, overrides)
    out = Path(args.out) if args.out else Path(args.workdir) / "eval"
    with on_mesh(mesh, cfg):
        result = commands.run_analysis(
            cfg, model, out, lengths=lengths, seed=args.seed, step=step,
            progress=not args.quiet, samples=commands.DEFAULT_SAMPLES["analyze"]
            if args.samples is None else args.samples)
    print(commands.analysis_markdown(result))
    print(f"wrote {out / 'analysis.json'}, {out / 'analysis.md'} and {out / 'analysis.png'}")
    return 0


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from hybridlm.eval import commands
    from hybridlm.eval.placement import on_mesh

    cfg, model, _, mesh = _load_run(args.workdir, args.step, overrides)
    with on_mesh(mesh, cfg):
        r = commands.generate_text(cfg, model, args.prompt, max_new=args.max_new,
                                   temperature=args.temperature, top_k=args.top_k,
                                   seed=args.seed)
    print(r["prompt"] + r["text"])
    for label, c in ((f"{r['max_len']} tokens", r["cache"]), ("128k tokens", r["cache_128k"])):
        print(f"KV cache at {label}: {c['hybrid_bytes'] / 2**20:.2f} MiB, full attention "
              f"{c['full_bytes'] / 2**20:.2f} MiB ({c['fraction']:.1%} of it)")
    return 0


COMMANDS = {"eval": cmd_eval, "analyze": cmd_analyze, "generate": cmd_generate}
