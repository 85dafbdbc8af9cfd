"""`hybridlm <command>`: the command line.

    hybridlm train [--config FILE[:k=v,...]] [--config.section.field=value ...] [--workdir DIR]
    hybridlm prepare [--config ...] [--source SPEC] [--tokenizer SPEC] [--out DIR]
    hybridlm eval --workdir W --task niah|ruler|ppl|all [--lengths N ...] [--depths F ...]
    hybridlm analyze --workdir W [--lengths N ...]
    hybridlm generate --workdir W --prompt TEXT [--max_new N --temperature T --top_k K]
    hybridlm export --workdir DIR [--step N] --out DIR [--format params|hf] [--arch A]
    hybridlm import --from HF_DIR --out DIR
    hybridlm compile [--config ...] --topology v5p:4x4x8 [--mfu 0.4] [--json FILE]
    hybridlm sweep --sweep FILE[:args] --launcher local|slurm|print [--root DIR] [--summarize]
    hybridlm sweep --sweep FILE[:args] --status [--root DIR]

`train`, `eval`, `analyze` and `generate` take the multi-host flags (`--coordinator HOST:PORT
--num_processes N --process_id I`, see hybridlm/parallel/distributed.py and
docs/launching.md).

Every error a user can meet is a class of hybridlm/errors.py, and `main` is the one place
that turns them into one paragraph on stderr and an exit status, never a traceback: 2 for a
mistake (bad config, missing file, busy workdir), 1 for a run that stopped (NaN streak, a
failed save, processes that cannot connect), 128 + the signal for Ctrl-C / SIGTERM before
training began.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__":  # `python -m hybridlm.cli`: the same as `python -m hybridlm`,
    from hybridlm.__main__ import main as _main  # so this file never runs as __main__

    _main()

from hybridlm import config as config_lib  # noqa: E402
from hybridlm.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    Interrupted,
    RunStopped,
    UserError,
)
from hybridlm.eval import cli as eval_cli  # noqa: E402
from hybridlm.parallel import distributed  # noqa: E402


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
    train.add_argument("--restart", action="store_true",
                       help="the workdir holds a run this one would not resume: move that run "
                       "aside to WORKDIR.old-<time>/ (nothing is deleted) and start afresh")
    distributed.add_cli_flags(train)
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
    eval_cli.add_parsers(sub)
    _add_export_parser(sub)
    _add_import_parser(sub)
    _add_sweep_parser(sub)
    _add_compile_parser(sub)
    return parser


# ---- hybridlm export ------------------------------------------------------------------------
EXPORT_FORMATS = ("params", "hf")


def _add_export_parser(sub) -> None:
    export = sub.add_parser(
        "export", help="write a run's parameters alone, for evaluation and sharing",
        description="Export the parameters of a run's latest (or --step) checkpoint, without "
        "optimizer or data state. `params`: Orbax params/ + config.json + export.json, "
        "readable by hybridlm.train.checkpoint.load_model and --config.train.init_from. "
        "See docs/checkpoints.md. `hf`: config.json + model.safetensors (+ tokenizer files) "
        "that transformers loads offline with AutoModelForCausalLM.from_pretrained(OUT), as "
        "Cohere2ForCausalLM, SmolLM3ForCausalLM or Llama4ForCausalLM, whichever computes "
        "exactly what the model computes; a model none of them matches is refused with the "
        "fields that differ (docs/interop.md).")
    export.add_argument("--workdir", required=True,
                        help="the run's workdir (or a checkpoints / checkpoint-step directory)")
    export.add_argument("--step", type=int, default=None,
                        help="the checkpoint step to export (default: the latest that restores)")
    export.add_argument("--out", required=True, help="new directory to write")
    export.add_argument("--format", choices=EXPORT_FORMATS, default="params",
                        help="params: this framework's params-only export (default); hf: a "
                        "Hugging Face transformers checkpoint")
    export.add_argument("--arch", choices=("auto", "cohere2", "smollm3", "llama4"),
                        default="auto", help="--format hf: the HF architecture (default: the "
                        "one that matches exactly)")


def cmd_export(args: argparse.Namespace, overrides: list[str]) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not empty; remove it or choose another")
    if args.format == "hf":
        return export_hf(args)
    import jax  # heavy imports after the arguments are checked
    from flax import nnx

    from hybridlm.runs import export_params, load_model

    cfg, model, step = load_model(Path(args.workdir), args.step)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    export_params(cfg, params, out, step)
    count = sum(x.size for x in jax.tree.leaves(params))
    print(f"exported step {step} of {args.workdir} ({count:,} parameters) to {out}")
    return 0


# ---- Hugging Face: export --format hf, import (docs/interop.md) ----------------------------
def export_hf(args: argparse.Namespace) -> int:
    from hybridlm.interop import hf

    arch = hf.export_hf(Path(args.workdir), Path(args.out), args.step, args.arch)
    print(f"exported {args.workdir} as {hf.hf_config.ARCHS[arch][0]} to {args.out}")
    return 0


def _add_import_parser(sub) -> None:
    imp = sub.add_parser(
        "import", help="a Hugging Face checkpoint directory -> a hybridlm params export",
        description="Read a transformers checkpoint directory (Cohere2, SmolLM3, or dense "
        "Llama 4 text; config.json + safetensors, offline) into a params-only hybridlm export "
        "with its resolved config and OUT/config.py: `hybridlm train --config OUT/config.py` "
        "trains on from it (train.init_from=OUT).")
    imp.add_argument("--from", dest="source", required=True, help="HF checkpoint directory")
    imp.add_argument("--out", required=True, help="new (or empty) output directory")


def cmd_import(args: argparse.Namespace, overrides: list[str]) -> int:
    from hybridlm.interop.hf import import_hf

    arch, _ = import_hf(Path(args.source), Path(args.out))
    print(f"imported {arch} from {args.source} into {args.out}; train on from it with: "
          f"hybridlm train --config {Path(args.out) / 'config.py'} --workdir RUN")
    return 0


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
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "empty" if out.is_dir() else "a directory"
        raise UserError(f"--out {out} exists and is not {what}; remove it or choose another")
    p = prepare.prepare_to(cfg.data, out, progress=progress)
    print(prepare.summary(p))
    print(f"train on it with --config.data.source={out}")
    return 0


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = config_lib.load(args.config, overrides)
    workdir = args.workdir or str(Path("runs") / Path(args.config.split(":")[0]).stem)
    joined = distributed.start(args, config_lib.to_json(cfg))  # before touching a device
    from hybridlm.train.trainer import train  # heavy imports after validation

    if joined.process_id == 0:
        print(f"training {args.config} in {workdir}", flush=True)
    train(cfg, workdir, restart=args.restart)
    return 0


# ---- sweep -------------------------------------------------------------------------

def _add_sweep_parser(sub) -> None:
    sweep = sub.add_parser(
        "sweep", help="run, print or summarise a sweep (one training run per point)",
        description="Each point of a sweep file's get_sweep(arg) trains in <root>/<point name>. "
        "--config.a.b=value overrides apply to every point. Finished points are skipped and "
        "interrupted ones resume; see docs/launching.md.")
    sweep.add_argument("--sweep", required=True,
                       help="sweep file with get_sweep(arg), as FILE or FILE:args "
                       "(e.g. configs/sweeps/context_length.py:lengths=4096+8192)")
    sweep.add_argument("--launcher", choices=("local", "slurm", "print"), default=None,
                       help="local: run the points here (--jobs chains at a time); slurm: "
                       "submit a job array; print: write the commands")
    sweep.add_argument("--jobs", type=int, default=1, metavar="N",
                       help="local: run up to N chains at once (a point and the stages that "
                       "start from it, init_from, run in order; default 1)")
    sweep.add_argument("--root", default=None,
                       help="the sweep's directory: one workdir per point, sweep.json, the "
                       "summary (default runs/<sweep file name>)")
    sweep.add_argument("--only", default=None, metavar="NAME",
                       help="run just this point and the stages that start from it (what "
                       "a slurm array task runs)")
    sweep.add_argument("--summarize", action="store_true",
                       help="gather every point's final metrics and eval results into "
                       "<root>/summary.md, summary.csv and summary.png (after --launcher, if "
                       "both are given)")
    sweep.add_argument("--status", action="store_true",
                       help="print each point's state (done / running / stopped / failed / "
                       "pending), last step and loss, and the ETA, read from the workdirs "
                       "(while points run, from any host that sees --root)")
    sweep.add_argument("--report", default=None, metavar="FILE.md",
                       help="with --summarize: also write a comparison report (tables of "
                       "losses, needle / RULER scores and attention mass by length, PNG plots "
                       "beside it) into FILE.md, between <!-- report:begin/end --> markers")


def cmd_sweep(args: argparse.Namespace, overrides: list[str]) -> int:
    from hybridlm import sweep

    if args.launcher is None and not args.summarize and not args.status:
        raise UserError("hybridlm sweep needs --launcher local|slurm|print, --summarize or "
                        "--status (or several)")
    if args.report and not args.summarize:
        raise UserError("--report FILE.md needs --summarize (the report is written after it)")
    root = Path(args.root or Path("runs") / Path(args.sweep.partition(":")[0]).stem)
    extra = [f"--config.{o}" for o in overrides]
    if args.status:
        from hybridlm.sweep_status import format_status, status

        print(format_status(args.sweep, root, status(args.sweep, root, extra)), flush=True)
    if args.launcher is not None:
        status = sweep.run(args.sweep, args.launcher, root, extra, only=args.only,
                           jobs=args.jobs)
        if status != 0:
            return status
        if args.launcher == "local" and args.only is None:  # every point's row, what next
            from hybridlm.sweep_status import finished_summary

            print(finished_summary(args.sweep, root, extra), flush=True)
    if args.summarize:
        print(f"wrote {sweep.summarize(args.sweep, root)} (and .csv, .png)")
    if args.report:
        from hybridlm.eval.report import write_report

        names = [p["name"] for p in sweep.load_sweep(args.sweep)]
        out = write_report(root, names, Path(args.report), f"sweep {args.sweep}, root {root}")
        print(f"wrote the report into {out} (plots under {out.parent / 'img' / out.stem})")
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
        if overrides and args.command in ("export", "import"):
            raise UserError(f"--config.* overrides are not accepted by {args.command}")
        commands = {"train": cmd_train, "prepare": cmd_prepare, "export": cmd_export,
                    "import": cmd_import, "sweep": cmd_sweep, "compile": cmd_compile,
                    **eval_cli.COMMANDS}
        return commands[args.command](args, overrides)
    except (UserError, ConfigError, CheckpointError) as e:
        print(f"hybridlm: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"hybridlm: training stopped: {e}", file=sys.stderr)
        return 1
    except distributed.DistributedError as e:
        print(f"hybridlm: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"hybridlm: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("hybridlm: interrupted (SIGINT)", file=sys.stderr)
        return 130
