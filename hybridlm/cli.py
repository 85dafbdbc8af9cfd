"""`hybridlm <command>`: the command line.

    hybridlm train [--config FILE[:k=v,...]] [--config.section.field=value ...] [--workdir DIR]
    hybridlm prepare [--config ...] [--source SPEC] [--tokenizer SPEC] [--out DIR]
    hybridlm compile [--config ...] --topology v5p:4x4x8 [--mfu 0.4] [--json FILE]

A user mistake (bad config, missing file) exits with status 2 and one paragraph on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hybridlm import config as config_lib


class UserError(Exception):
    """A mistake the user can fix; printed without a traceback."""


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.a.b=v` (or `--config.a.b v`) overrides from the other flags."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" not in arg:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise UserError(f"{arg} needs a value: {arg}=VALUE")
                arg, i = f"{arg}={argv[i + 1]}", i + 1
            overrides.append(arg[len("--config."):])
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridlm", description="Long-context LM pretraining around the hybrid "
        "RoPE-SWA / NoPE attention stack.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="train a model (resumes from the workdir's checkpoints)",
        description="Train a model. Config fields are overridden with --config.a.b=value.")
    train.add_argument("--config", default=config_lib.DEFAULT_CONFIG,
                       help="config file with get_config(arg), as FILE or FILE:k=v,... "
                       f"(default {config_lib.DEFAULT_CONFIG})")
    train.add_argument("--workdir", default=None,
                       help="where the run writes config.json, metrics.jsonl, tb/ "
                       "(default runs/<config name>)")
    prepare = sub.add_parser(
        "prepare", help="tokenise data.source into ArrayRecord shards plus a manifest",
        description="Tokenise the config's data.source with data.tokenizer into ArrayRecord "
        "shards plus a manifest (documents, tokens, a length histogram). Without --out the "
        "result goes to the cache that `hybridlm train` reads (data.cache_dir, else "
        "$HYBRIDLM_CACHE, else ~/.cache/hybridlm); with --out, train on it with "
        "--config.data.source=DIR. Sources and tokenizers: docs/data.md.")
    prepare.add_argument("--config", default=config_lib.DEFAULT_CONFIG,
                         help=f"config file (default {config_lib.DEFAULT_CONFIG})")
    prepare.add_argument("--source", default=None,
                         help="shorthand for --config.data.source (stdlib, shakespeare, a path, "
                         "jsonl:PATH, parquet:PATH)")
    prepare.add_argument("--tokenizer", default=None,
                         help="shorthand for --config.data.tokenizer (byte, bpe:VOCAB, a "
                         "tokenizer.json or SentencePiece .model)")
    prepare.add_argument("--out", default=None,
                         help="write the prepared directory here instead of the cache (one "
                         "source only)")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_compile_parser(sub)
    return parser


def _add_compile_parser(sub) -> None:
    compile_ = sub.add_parser(
        "compile", help="compile the train step for a TPU slice here (no TPU needed): memory, "
        "FLOPs, step time, fits or not",
        description="Compile the config's train step for a TPU topology ahead of time (needs "
        "libtpu: pip install 'hybridlm[tpu]'; no TPU) and report per-device memory against "
        "the chip's HBM, FLOPs per step and the step time at --mfu. Mesh and model fields are "
        "overridden with --config.a.b=value. docs/scaling.md.")
    compile_.add_argument("--config", default=config_lib.DEFAULT_CONFIG,
                          help=f"config file (default {config_lib.DEFAULT_CONFIG})")
    compile_.add_argument("--topology", required=True,
                          help="KIND:AxBxC with KIND v4, v5e, v5p or v6e, e.g. v5p:4x4x8")
    compile_.add_argument("--mfu", type=float, default=0.4,
                          help="model FLOPs utilisation assumed for the step time (default 0.4)")
    compile_.add_argument("--json", default=None, help="also write the report here as JSON")


def cmd_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    for field in ("source", "tokenizer"):
        if getattr(args, field) is not None:
            overrides = [*overrides, f"data.{field}={getattr(args, field)}"]
    cfg = config_lib.load(args.config, overrides)
    from hybridlm.data import prepare

    progress = not args.quiet
    if args.out is None:
        _, prepared = prepare.resolve(cfg.data, progress=progress)
        for p, _ in prepared:
            print(prepare.summary(p))
        return 0
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; remove it or choose another")
    p = prepare.prepare_to(cfg.data, out, progress=progress)
    print(prepare.summary(p))
    print(f"train on it with --config.data.source={out}")
    return 0


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = config_lib.load(args.config, overrides)
    workdir = args.workdir or str(Path("runs") / Path(args.config.split(":")[0]).stem)
    from hybridlm.train.trainer import NonFiniteLoss, train  # heavy imports after validation

    print(f"training {args.config} in {workdir}", flush=True)
    try:
        train(cfg, workdir)
    except NonFiniteLoss as e:
        print(f"hybridlm: training stopped: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_compile(args: argparse.Namespace, overrides: list[str]) -> int:
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu {args.mfu} must be in (0, 1]")
    cfg = config_lib.load(args.config, overrides)
    import os

    import jax

    if "JAX_PLATFORMS" not in os.environ:  # it only compiles: skip the accelerator probe
        jax.config.update("jax_platforms", "cpu")
    from hybridlm.train import aot

    topology = aot.parse_topology(args.topology)
    try:
        devices = aot.tpu_devices(topology)
    except aot.TPUSupportMissing as e:
        raise UserError(str(e)) from e
    print(f"compiling {args.config} for {topology.name} ({len(devices)} devices)", flush=True)
    report = aot.compile_for(cfg, topology, mfu=args.mfu, devices=devices)
    print(aot.format_report(report, topology))
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(
            report.as_dict(topology.peak_flops_per_chip), indent=1) + "\n")
    return 0 if report.fits else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        rest, overrides = _split_overrides(argv)
        args = _parser().parse_args(rest)
        if overrides and args.command not in ("train", "prepare", "compile"):
            raise UserError(f"--config.* overrides are not accepted by {args.command}")
        commands = {"train": cmd_train, "prepare": cmd_prepare, "compile": cmd_compile}
        return commands[args.command](args, overrides)
    except (UserError, config_lib.ConfigError) as e:
        print(f"hybridlm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
