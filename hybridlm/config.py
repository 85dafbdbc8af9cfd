"""Config schema, loading, overrides and validation.

Configs are Python files with `get_config(arg) -> ConfigDict` (big_vision style):

    hybridlm train --config configs/paper.py:variant=rnope_swa,seq_len=32768 \
        --config.train.steps=500 --workdir runs/x

`defaults()` is the schema: every field exists there with its default and a comment.
`load()` builds a config file's ConfigDict, applies `a.b=value` overrides, fills the
layer-type table, and validates it, so that a mistake is one clear `ConfigError` naming
the field, raised before anything is compiled.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_collections as mlc

from hybridlm.errors import ConfigError  # also hybridlm.config.ConfigError, as configs use
from hybridlm.model.pattern import (
    LAYER_FIELDS,
    QK_NORMS,
    ROPE_STYLES,
    layer_defaults,
    parse_pattern,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "configs/tiny.py"


def defaults() -> mlc.ConfigDict:
    """The full schema with defaults. Config files start from this and change fields."""
    c = mlc.ConfigDict()

    c.model = m = mlc.ConfigDict()
    m.vocab_size = 512  # embedding rows; must be >= the tokenizer's vocabulary
    m.d_model = 256  # residual stream width
    m.num_layers = 4  # depth; the pattern repeats to fill it
    m.num_heads = 4  # query heads
    m.num_kv_heads = 4  # key/value heads (GQA when fewer than num_heads)
    m.head_dim = 64  # width of one head
    m.mlp_dim = 1024  # hidden width of the gated MLP
    m.activation = "silu"  # gated MLP activation: "silu" (SwiGLU) | "gelu" (GeGLU)
    m.norm = "rms"  # "rms" | "layernorm" (Cohere: mean-centred, no bias)
    m.norm_eps = 1e-6  # epsilon of every norm
    m.block = "sequential"  # "sequential" (x+attn, then x+mlp) | "parallel" (Cohere)
    m.tie_embeddings = True  # LM head shares the embedding matrix
    m.logit_scale = 1.0  # multiplies the logits (Cohere: 0.25)
    m.layer_types = {"global": {}}  # name -> LayerSpec fields (hybridlm/model/pattern.py)
    m.pattern = "global"  # comma-separated layer-type names, repeated to num_layers
    m.allow_partial_pattern = False  # let num_layers % len(pattern) != 0 (Gemma 3)
    m.scan_layers = True  # scan over pattern groups (False: unrolled, same numbers)
    m.remat = "none"  # rematerialisation: "none" | "full" | "dots" | "dots_no_batch"
    m.attention_impl = "auto"  # attention kernel: see hybridlm.ops.IMPLS
    m.attention_block_q = 256  # query rows per attention tile (blockwise, splash)
    m.attention_block_kv = 256  # key columns per attention tile (windows use <= window/8)
    m.dtype = "float32"  # activation dtype: "float32" | "bfloat16" (params stay float32)
    m.init_std = 0.02  # std of the weight init (output projections: / sqrt(2 * layers))

    c.data = d = mlc.ConfigDict()  # docs/data.md
    d.source = "stdlib"  # stdlib | shakespeare | PATH | jsonl:PATH | parquet:PATH | DIR; a,b mixes
    d.weights = ""  # mixing weights of the sources in data.source, comma-separated ("" = equal)
    d.tokenizer = "byte"  # "byte" | "bpe:VOCAB" (trained on the source) | tokenizer.json | .model
    d.eos_token = ""  # end-of-document token of a user tokenizer ("" = the first usual one found)
    d.bos_token = ""  # its beginning-of-document token ("" = the first usual one, else eos)
    d.text_field = "text"  # the JSONL field / Parquet column that holds the text
    d.on_bad_record = "error"  # a bad JSONL line: "error" (names file:line) | "skip" (and count)
    d.cache_dir = ""  # prepared data and trained BPEs ("" = $HYBRIDLM_CACHE or ~/.cache/hybridlm)
    d.seq_len = 512  # training sequence length in tokens
    d.packing = "first_fit"  # "first_fit" | "best_fit" | "concat" (concat-then-split, no padding)
    d.val_fraction = 0.02  # share of documents held out for validation (chosen by name hash)
    d.min_doc_tokens = 0  # leave out training documents shorter than this many tokens
    d.long_doc_tokens = 0  # documents of at least this many tokens are up-weighted (0: off)
    d.long_doc_repeat = 1  # ... by appearing this many times per epoch
    d.workers = 0  # Grain worker processes (0: read in the training process, with threads)

    c.train = t = mlc.ConfigDict()
    t.steps = 300  # optimizer steps
    t.batch_size = 8  # global batch, in sequences
    t.seed = 0  # seeds parameters and data order
    t.optimizer = "adamw"  # "adamw" | "adafactor" (factored second moments, less memory)
    t.learning_rate = 3e-3  # peak learning rate
    t.schedule = "cosine"  # after warmup: "cosine" decay | "wsd" (stable, then decay) | "constant"
    t.warmup_steps = 30  # linear warmup from 0 to the peak
    t.min_lr_ratio = 0.1  # cosine and wsd end at this fraction of the peak
    t.decay_fraction = 0.2  # wsd: the last fraction of the steps decays linearly
    t.weight_decay = 0.1  # decoupled weight decay (matrices only, not norms or biases)
    t.b1 = 0.9  # AdamW beta1 (adafactor keeps no momentum)
    t.b2 = 0.95  # AdamW beta2
    t.grad_clip = 1.0  # clip the global gradient norm to this (0: off)
    t.grad_accum_steps = 1  # microbatches per step: batch_size is split into this many
    t.z_loss = 0.0  # weight of mean(log Z^2), keeps the softmax normaliser near 1 (PaLM: 1e-4)
    # the LM head and loss fused over chunks of this many positions, so the batch's logits
    # never exist whole (-1: the largest chunk whose logits fit 8 MiB per device on CPU,
    # 1 GiB elsewhere; 0: whole logits, plain autodiff)
    t.loss_chunk = -1
    t.max_nan_streak = 5  # stop after this many non-finite losses in a row (each is skipped)
    t.init_from = ""  # new stage: start from the params of this workdir, checkpoint or export
    t.init_from_opt_state = False  # ... and its optimizer state (training checkpoints only)

    c.mesh = mh = mlc.ConfigDict()
    mh.data = -1  # data-parallel replicas (-1: the devices the other axes leave)
    mh.fsdp = 1  # split parameters and optimizer state (and the batch) over this many
    mh.context = 1  # split the sequence over this many devices
    mh.tensor = 1  # split heads, MLP units and vocabulary over this many devices
    # context parallelism (mesh.context > 1; hybridlm/parallel/context.py, docs/training.md)
    mh.context_attention = "allgather"  # full layers fetch keys by "allgather" | "ring"
    mh.context_layout = "zigzag"  # "zigzag" (equal causal work per device) | "contiguous"

    c.eval = ev = mlc.ConfigDict()
    ev.every = 100  # evaluate on the validation split every this many steps (0: at the end)
    ev.steps = 10  # validation batches (of train.batch_size) per evaluation (0: none,
    # -1: the whole validation split once; the same batches at every evaluation)

    c.log = lg = mlc.ConfigDict()
    lg.every = 10  # log metrics every this many steps
    lg.peak_flops = 0.0  # per-device peak FLOP/s for MFU (0: from the device table; CPU: none)

    c.checkpoint = ck = mlc.ConfigDict()  # docs/checkpoints.md
    ck.enabled = True  # save checkpoints and resume from them (False: neither)
    ck.dir = ""  # where checkpoints go ("" = <workdir>/checkpoints)
    ck.every = 100  # save every this many steps, and always at the last (0: only at the last)
    ck.keep = 3  # keep the newest this many checkpoints (0: keep all)
    ck.keep_every = 0  # also keep, forever, those whose step is a multiple of this (0: none)
    ck.async_save = True  # write in the background while training goes on
    return c


# Model shapes by name: (d_model, num_layers, num_heads, num_kv_heads, head_dim, mlp_dim, vocab).
MODEL_SIZES = {
    "tiny": (256, 4, 4, 4, 64, 1024, 512),  # CPU-sized; byte tokenizer vocabulary
    "small": (512, 8, 8, 4, 64, 2048, 8192),
    "150m": (768, 12, 12, 4, 64, 3072, 32768),
    "1b": (2048, 16, 16, 8, 128, 8192, 131072),
    "8b": (4096, 32, 32, 8, 128, 14336, 256000),  # the paper's 8B shape (Cohere vocabulary)
}


def set_size(model: mlc.ConfigDict, size: str) -> None:
    """Set the model's shape fields from MODEL_SIZES."""
    if size not in MODEL_SIZES:
        raise ConfigError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    (model.d_model, model.num_layers, model.num_heads, model.num_kv_heads, model.head_dim,
     model.mlp_dim, model.vocab_size) = MODEL_SIZES[size]


def parse_arg(arg: str | None, **spec: Any) -> mlc.ConfigDict:
    """'variant=rope,seq_len=4096' -> ConfigDict, typed by the defaults given in spec."""
    out = mlc.ConfigDict(dict(spec))
    for item in (arg or "").split(","):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key not in spec:
            raise ConfigError(f"unknown config argument {key!r}; known: {sorted(spec)}")
        if not sep:
            raw = "True"  # a bare flag, e.g. `:runlocal`
        value = _literal(raw.strip())
        default = spec[key]
        if default is not None and not isinstance(value, type(default)):
            if isinstance(default, float) and isinstance(value, int):
                value = float(value)
            elif isinstance(default, str):
                value = str(raw.strip())
            else:
                raise ConfigError(f"config argument {key}={raw!r}: expected "
                                  f"{type(default).__name__}")
        out[key] = value
    return out


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def resolve_config_path(path: str) -> Path:
    """A config path as given, or relative to the repository (for `configs/...`)."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {path!r} not found (looked in the current directory and "
                      f"in {REPO_ROOT}); pass a path like configs/tiny.py")


def load_function(spec: str, name: str):
    """'path/to/file.py[:arg]' -> (that file's function `name`, arg or None, its path)."""
    path_str, _, arg = spec.partition(":")
    path = resolve_config_path(path_str)
    module_spec = importlib.util.spec_from_file_location(f"hybridlm_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001  (whatever the file's own code raises)
        raise ConfigError(f"{path}:{_line_in(e, path)}: {type(e).__name__}: {e}") from None
    if not hasattr(module, name):
        raise ConfigError(f"{path} has no {name}(arg) function")
    return getattr(module, name), arg or None, path


def _line_in(error: BaseException, path: Path) -> int | str:
    """The line of `path` where `error` was raised (the innermost frame in that file)."""
    line: int | str = "?"
    tb = error.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename) == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def from_file(spec: str) -> mlc.ConfigDict:
    """'path/to/file.py[:arg]' -> the ConfigDict that file's get_config(arg) returns."""
    get_config, arg, path = load_function(spec, "get_config")
    cfg = get_config(arg)
    if not isinstance(cfg, mlc.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
    return cfg


def apply_override(cfg: mlc.ConfigDict, override: str) -> None:
    """Set one 'a.b.c=value' override in place; the value is a Python literal or a string."""
    key, sep, raw = override.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form section.field=value")
    *parents, leaf = key.split(".")
    node = cfg
    for i, part in enumerate(parents):
        if not isinstance(node, mlc.ConfigDict) or part not in node:
            raise ConfigError(_unknown(".".join(parents[: i + 1]), part, node))
        node = node[part]
    if not isinstance(node, mlc.ConfigDict) or leaf not in node:
        raise ConfigError(_unknown(key, leaf, node))
    value, old = _literal(raw.strip()), node[leaf]
    if isinstance(old, str) and not isinstance(value, str):
        value = raw.strip()
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, mlc.ConfigDict) or (
            old is not None and value is not None and type(value) is not type(old)):
        raise ConfigError(f"config.{key}={raw!r}: expected a {type(old).__name__} like "
                          f"{old!r}")
    try:
        node[leaf] = value
    except TypeError as e:  # ml_collections refuses to change a field's type
        raise ConfigError(f"config.{key}={raw!r}: {e}") from None


MOVED = {"data.eval_batches": "eval.steps (-1: the whole validation split)"}


def _unknown(path: str, name: str, node: Any) -> str:
    if path in MOVED:
        return f"config field {path!r} is now {MOVED[path]}"
    known = list(node.keys()) if isinstance(node, mlc.ConfigDict) else []
    hint = difflib.get_close_matches(name, known, n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown config field {path!r}{did_you_mean}; fields here: {sorted(known)}"


def load(spec: str | None = None, overrides: Iterable[str] = ()) -> mlc.ConfigDict:
    """Build, override, complete and validate a config. Raises ConfigError on mistakes."""
    cfg = from_file(spec or DEFAULT_CONFIG)
    _check_keys(cfg, defaults(), "")
    _fill_layer_types(cfg)
    for override in overrides:
        apply_override(cfg, override)
    _fill_layer_types(cfg)
    validate(cfg)
    return cfg


def _check_keys(cfg: mlc.ConfigDict, schema: mlc.ConfigDict, prefix: str) -> None:
    """Every key of cfg must exist in the schema (layer-type entries are user-named)."""
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(_unknown(path, key, schema))
        if path == "model.layer_types":
            continue
        if isinstance(schema[key], mlc.ConfigDict) and isinstance(cfg[key], mlc.ConfigDict):
            _check_keys(cfg[key], schema[key], path + ".")
    missing = [k for k in schema.keys() if k not in cfg]
    if missing:
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where} lacks fields {missing}: build configs on "
                          "hybridlm.config.defaults()")


def _fill_layer_types(cfg: mlc.ConfigDict) -> None:
    """Complete every layer-type entry with the LayerSpec defaults, rejecting unknown fields."""
    types = cfg.model.layer_types
    if not isinstance(types, mlc.ConfigDict) or not types:
        raise ConfigError("model.layer_types must be a non-empty table: name -> fields")
    for name in types.keys():
        entry = types[name]
        if not isinstance(entry, mlc.ConfigDict):
            raise ConfigError(f"model.layer_types.{name} must be a table of LayerSpec fields")
        for key in entry.keys():
            if key not in LAYER_FIELDS:
                raise ConfigError(_unknown(f"model.layer_types.{name}.{key}", key,
                                           mlc.ConfigDict(layer_defaults())))
        filled = layer_defaults()
        filled.update(entry.to_dict())
        types[name] = mlc.ConfigDict(filled)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_int(value: Any, field: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
             f"{field} must be an integer >= 1{' or None' if allow_none else ''}, got {value!r}")


def validate(cfg: mlc.ConfigDict) -> None:
    """Check a filled config; every rule names its field."""
    from hybridlm.model.layers import ACTIVATIONS, NORMS
    from hybridlm.model.transformer import BLOCKS, DTYPES, REMAT_POLICIES
    from hybridlm.ops import IMPLS  # choice lists from their owners (none imports config)

    m = cfg.model
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "mlp_dim"):
        _positive_int(m[field], f"model.{field}")
    _require(m.num_heads % m.num_kv_heads == 0,
             f"model.num_heads ({m.num_heads}) must be a multiple of model.num_kv_heads "
             f"({m.num_kv_heads})")
    for field, allowed in (("activation", tuple(ACTIVATIONS)), ("norm", NORMS),
                           ("block", BLOCKS), ("remat", tuple(REMAT_POLICIES)),
                           ("attention_impl", IMPLS), ("dtype", tuple(DTYPES))):
        _require(m[field] in allowed, f"model.{field} is {m[field]!r}; choose one of {allowed}")
    for field in ("attention_block_q", "attention_block_kv"):
        _positive_int(m[field], f"model.{field}")
        _require(m[field] % 8 == 0, f"model.{field} ({m[field]}) must be a multiple of 8 "
                 "(tiles map onto vector registers and TPU sublanes)")
    names = parse_pattern(m.pattern)
    _require(bool(names), "model.pattern is empty; give comma-separated layer-type names")
    for name in names:
        _require(name in m.layer_types, f"model.pattern names {name!r}, which is not in "
                 f"model.layer_types (defined: {sorted(m.layer_types.keys())})")
    _require(m.num_layers % len(names) == 0 or m.allow_partial_pattern,
             f"model.num_layers ({m.num_layers}) is not a multiple of the pattern length "
             f"({len(names)}: {m.pattern!r}); change one of them, or set "
             "model.allow_partial_pattern=True to fill the remaining layers with the "
             "pattern's first entries")
    for name in m.layer_types.keys():
        _validate_layer_type(m.layer_types[name], f"model.layer_types.{name}", m.head_dim)
    _validate_data(cfg.data, m.vocab_size)
    _positive_int(cfg.train.batch_size, "train.batch_size")
    _require(isinstance(cfg.train.steps, int) and cfg.train.steps >= 0,
             f"train.steps must be an integer >= 0, got {cfg.train.steps!r}")
    _positive_int(cfg.log.every, "log.every")
    _require(cfg.log.peak_flops >= 0, "log.peak_flops must be >= 0 (0: look the device up)")
    _validate_train(cfg.train)
    chunk, seq_len = cfg.train.loss_chunk, cfg.data.seq_len
    _require(chunk <= 0 or seq_len % chunk == 0,
             f"train.loss_chunk ({chunk}) must divide data.seq_len ({seq_len}); or use -1 to "
             "pick one")
    _validate_mesh(cfg.mesh)
    _validate_checkpoint(cfg.checkpoint, cfg.train)
    every, steps = cfg.eval.every, cfg.eval.steps
    _require(isinstance(every, int) and not isinstance(every, bool) and every >= 0,
             f"eval.every must be an integer >= 0, got {every!r}")
    _require(isinstance(steps, int) and not isinstance(steps, bool) and steps >= -1,
             f"eval.steps must be an integer >= -1 (-1: the whole validation split, 0: no "
             f"evaluation), got {steps!r}")


def _validate_train(t: mlc.ConfigDict) -> None:
    from hybridlm.train.optim import OPTIMIZERS, SCHEDULES

    _require(t.learning_rate > 0, "train.learning_rate must be > 0")
    _require(t.optimizer in OPTIMIZERS,
             f"train.optimizer is {t.optimizer!r}; choose one of {OPTIMIZERS}")
    _require(t.schedule in SCHEDULES,
             f"train.schedule is {t.schedule!r}; choose one of {SCHEDULES}")
    _require(isinstance(t.warmup_steps, int) and t.warmup_steps >= 0,
             f"train.warmup_steps must be an integer >= 0, got {t.warmup_steps!r}")
    _require(0.0 <= t.min_lr_ratio <= 1.0,
             f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    _require(0.0 <= t.decay_fraction <= 1.0,
             f"train.decay_fraction must be in [0, 1], got {t.decay_fraction}")
    _require(t.weight_decay >= 0, "train.weight_decay must be >= 0")
    _require(0.0 <= t.b1 < 1.0 and 0.0 <= t.b2 < 1.0, "train.b1 and train.b2 must be in [0, 1)")
    _require(t.grad_clip >= 0, "train.grad_clip must be >= 0 (0: off)")
    _require(t.z_loss >= 0, "train.z_loss must be >= 0 (0: off)")
    _require(isinstance(t.loss_chunk, int) and t.loss_chunk >= -1,
             f"train.loss_chunk must be an integer >= -1 (-1: auto, 0: off), got {t.loss_chunk!r}")
    _positive_int(t.grad_accum_steps, "train.grad_accum_steps")
    _positive_int(t.max_nan_streak, "train.max_nan_streak")
    _require(t.batch_size % t.grad_accum_steps == 0,
             f"train.batch_size ({t.batch_size}) must be a multiple of train.grad_accum_steps "
             f"({t.grad_accum_steps}): each microbatch has batch_size / grad_accum_steps rows")


def _validate_checkpoint(ck: mlc.ConfigDict, t: mlc.ConfigDict) -> None:
    """(Types are held by ConfigDict and the override parser; these are the value rules.)"""
    for field in ("every", "keep", "keep_every"):
        value = ck[field]
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                 f"checkpoint.{field} must be an integer >= 0, got {value!r}")
    _require(not t.init_from_opt_state or bool(t.init_from),
             "train.init_from_opt_state=True needs train.init_from (the run to start from)")
    _require(not t.init_from or Path(t.init_from).expanduser().exists(),
             f"train.init_from {t.init_from!r}: no such directory; give a run's workdir, one "
             "of its checkpoint directories, or a `hybridlm export` directory")


def _validate_mesh(mesh: mlc.ConfigDict) -> None:
    """Static checks; whether the mesh fits the devices is checked when the job starts."""
    from hybridlm.parallel import context
    from hybridlm.parallel.mesh import MESH_AXES

    for axis in MESH_AXES:
        value = mesh[axis]
        _require(isinstance(value, int) and not isinstance(value, bool)
                 and (value == -1 or value >= 1),
                 f"mesh.{axis} must be an integer >= 1, or -1 for the remaining devices; "
                 f"got {value!r}")
    for field, allowed in (("context_attention", context.IMPLS),
                           ("context_layout", context.LAYOUTS)):
        _require(mesh[field] in allowed,
                 f"mesh.{field} is {mesh[field]!r}; choose one of {allowed}")
    free = [axis for axis in MESH_AXES if mesh[axis] == -1]
    _require(len(free) <= 1, f"only one mesh field may be -1 (the rest of the devices); "
             f"got {', '.join('mesh.' + a for a in free)}")


def _validate_data(d: mlc.ConfigDict, vocab_size: int) -> None:
    from hybridlm.data.plan import PACKINGS
    from hybridlm.data.sources import parse_sources
    from hybridlm.data.tokenizers import parse_bpe_spec, static_vocab_size

    _positive_int(d.seq_len, "data.seq_len")
    _require(isinstance(d.source, str), f"data.source must be a string, got {d.source!r}")
    _require(isinstance(d.weights, str), f"data.weights must be a string like '3,1', got "
             f"{d.weights!r}")
    parse_sources(d.source, d.weights)
    _require(isinstance(d.tokenizer, str) and bool(d.tokenizer),
             "data.tokenizer must be 'byte', 'bpe:VOCAB' or a tokenizer file")
    if d.tokenizer != "byte" and parse_bpe_spec(d.tokenizer) is None:
        _require(Path(d.tokenizer).expanduser().is_file(),
                 f"data.tokenizer {d.tokenizer!r}: no such file; give 'byte', 'bpe:VOCAB', a "
                 "tokenizer.json or a SentencePiece .model")
    vocab = static_vocab_size(d.tokenizer)
    name = "byte tokenizer" if d.tokenizer == "byte" else f"tokenizer {d.tokenizer!r}"
    _require(vocab is None or vocab_size >= vocab,
             f"model.vocab_size ({vocab_size}) is smaller than the {name}'s vocabulary "
             f"({vocab}); raise model.vocab_size to at least {vocab}")
    _require(d.packing in PACKINGS, f"data.packing is {d.packing!r}; choose one of {PACKINGS}")
    _require(isinstance(d.val_fraction, float) and 0.0 <= d.val_fraction < 1.0,
             f"data.val_fraction must be a number in [0, 1), got {d.val_fraction!r}")
    for field in ("min_doc_tokens", "long_doc_tokens", "workers"):
        value = d[field]
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                 f"data.{field} must be an integer >= 0, got {value!r}")
    _positive_int(d.long_doc_repeat, "data.long_doc_repeat")
    _require(d.on_bad_record in ("error", "skip"),
             f"data.on_bad_record is {d.on_bad_record!r}; choose 'error' or 'skip'")
    _require(isinstance(d.text_field, str) and bool(d.text_field),
             "data.text_field must name the JSONL field / Parquet column holding the text")


def _validate_layer_type(t: mlc.ConfigDict, where: str, head_dim: int) -> None:
    _positive_int(t.window, f"{where}.window", allow_none=True)
    _positive_int(t.chunk, f"{where}.chunk", allow_none=True)
    _positive_int(t.temperature_floor, f"{where}.temperature_floor", allow_none=True)
    for flag in ("rope", "qk_norm_scale", "sink"):
        _require(isinstance(t[flag], bool), f"{where}.{flag} must be True or False, got "
                 f"{t[flag]!r}")
    _require(isinstance(t.temperature_scale, (int, float)) and t.temperature_scale > 0,
             f"{where}.temperature_scale must be a number > 0, got {t.temperature_scale!r}")
    _require(t.rope_style in ROPE_STYLES, f"{where}.rope_style is {t.rope_style!r}; "
             f"choose one of {ROPE_STYLES}")
    _require(t.qk_norm in QK_NORMS, f"{where}.qk_norm is {t.qk_norm!r}; choose one of {QK_NORMS}")
    _require(not t.rope or t.rope_theta > 0, f"{where}.rope_theta must be > 0")
    _require(not t.rope or head_dim % 2 == 0,
             f"model.head_dim ({head_dim}) must be even for RoPE (layer type {where})")


def to_json(cfg: mlc.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def save(cfg: mlc.ConfigDict, path: str | Path) -> None:
    """Write the resolved config as JSON, atomically (a new file renamed over the old)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(to_json(cfg) + "\n")
    os.replace(tmp, path)


def from_json(text: str) -> mlc.ConfigDict:
    """Inverse of to_json (e.g. the config.json a run wrote)."""
    return mlc.ConfigDict(json.loads(text))


def model_dict(cfg: mlc.ConfigDict) -> dict[str, Any]:
    """The model section as plain Python values (what Transformer and flops read)."""
    return cfg.model.to_dict()
