"""MaxText itself as the measured peer: its pre-training loop at bench/train.py's shapes.

Runs under MaxText's own Python (3.12; bench/maxtext_setup.sh builds it), not hybridlm's:

    $MAXTEXT_PYTHON bench/peer_maxtext.py --config config.json --documents docs.npz

bench/train.py --peer maxtext calls it after each case with that case's hybridlm config
(JSON) and documents of its corpus (token ids from hybridlm's own data pipeline, one array
per document, at most seq_len long). This script translates the config into MaxText's
settings (`maxtext_settings`: llama2 blocks of the same shape, batch, sequence length and
AdamW; dense `dot_product` attention on every layer), writes the documents to a local
parquet file of pre-tokenised rows and a word-level Hugging Face tokenizer of the same
vocabulary (MaxText builds a tokenizer even for pre-tokenised data, for its padding id),
and runs `python -m maxtext.trainers.pre_train.train` on the CPU with checkpointing,
goodput and TensorBoard off and packing as hybridlm packs. Extra `key=value` arguments go
to MaxText last (they win). Only the standard library is imported at the top, so hybridlm's
tests check the translation without MaxText installed.

MaxText's per-step "seconds" is the gap between dispatches: step 0 includes compiling and
step 1 is short (STACK_NOTES.md), so the step time reported is the median of steps >= 2.
The last stdout line is one JSON object: step_s, all_step_s, losses, and what ran.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIRST_TIMED_STEP = 2  # step 0 compiles, step 1 is short: MaxText times dispatch gaps

# hybridlm's remat -> MaxText's remat_policy: MaxText has no "none"; "minimal" (keep the
# matmul outputs) recomputes least. STACK_NOTES: full and minimal time alike on this CPU.
REMAT = {"none": "minimal", "dots": "minimal", "dots_no_batch": "minimal", "full": "full"}
PACKING = {"first_fit": "first_fit", "best_fit": "best_fit", "concat": "concat_then_split"}
# Fields of hybridlm's config a MaxText llama2 run cannot express, and the value it needs.
REQUIRED = {("model", "norm"): "rms", ("model", "block"): "sequential",
            ("model", "logit_scale"): 1.0, ("train", "optimizer"): "adamw",
            ("train", "grad_accum_steps"): 1}
LAYER_REQUIRED = {"rope_style": "half", "qk_norm": "none", "chunk": None,
                  "temperature_floor": None, "sink": False}


def _number(x: float) -> int | float:
    """10000.0 -> 10000: MaxText's config types rope_max_timescale as an integer."""
    return int(x) if float(x).is_integer() else x


def maxtext_settings(config: dict) -> dict[str, object]:
    """hybridlm's config (ConfigDict.to_dict()) -> MaxText settings of the same model, batch
    and optimizer: llama2 blocks (RMSNorm, RoPE, gated MLP, no biases), one device.

    Every layer runs full causal RoPE attention (`dot_product`, the kernel MaxText runs on a
    CPU): hybridlm's windows and NoPE layers are not translated, on purpose, since the peer
    is the standard model at the same shape (STACK_NOTES.md's side-by-side run). The
    learning-rate schedule is not translated either: it does not change a step's work.
    Raises ValueError naming the first field MaxText's llama2 block cannot express."""
    model, train = config["model"], config["train"]
    for (section, field), needed in REQUIRED.items():
        if config[section][field] != needed:
            raise ValueError(f"{section}.{field}={config[section][field]!r} has no MaxText "
                             f"llama2 equivalent here (the peer needs {needed!r})")
    thetas = set()
    for name, layer in model["layer_types"].items():
        for field, needed in LAYER_REQUIRED.items():
            if layer[field] != needed:
                raise ValueError(f"model.layer_types.{name}.{field}={layer[field]!r} has no "
                                 f"MaxText llama2 equivalent here (the peer needs {needed!r})")
        if layer["rope"]:
            thetas.add(float(layer["rope_theta"]))
    if len(thetas) > 1:
        raise ValueError(f"model.layer_types: RoPE thetas {sorted(thetas)} differ; MaxText's "
                         "llama2 block has one rope_max_timescale")
    settings = {
        "decoder_block": "llama2", "base_emb_dim": model["d_model"],
        "base_num_decoder_layers": model["num_layers"],
        "base_num_query_heads": model["num_heads"], "base_num_kv_heads": model["num_kv_heads"],
        "head_dim": model["head_dim"], "base_mlp_dim": model["mlp_dim"],
        "mlp_activations": f"['{model['activation']}','linear']",
        "vocab_size": model["vocab_size"], "logits_via_embedding": model["tie_embeddings"],
        "normalization_layer_epsilon": model["norm_eps"],
        "dtype": model["dtype"], "weight_dtype": "float32",
        "remat_policy": REMAT[model["remat"]], "attention": "dot_product",
        "max_target_length": config["data"]["seq_len"],
        "grain_packing_type": PACKING[config["data"]["packing"]],
        "per_device_batch_size": train["batch_size"], "init_weights_seed": train["seed"],
        "opt_type": "adamw", "learning_rate": train["learning_rate"], "adam_b1": train["b1"],
        "adam_b2": train["b2"], "adam_weight_decay": train["weight_decay"],
        "gradient_clipping_threshold": train["grad_clip"],
        "z_loss_multiplier": train["z_loss"],
    }
    if thetas:  # (with no RoPE layer at all MaxText keeps its own default)
        settings["rope_max_timescale"] = _number(thetas.pop())
    return settings


# Single-host CPU run with every cloud, checkpoint and monitoring feature off.
RUN = {
    "hardware": "cpu", "skip_jax_distributed_system": True, "enable_checkpointing": False,
    "enable_goodput_recording": False, "monitor_goodput": False, "enable_tensorboard": False,
    "gcs_metrics": False, "save_config_to_gcs": False, "profiler": "''", "jax_cache_dir": "''",
    "eval_interval": -1, "log_period": 1_000_000, "log_config": False,
    "dataset_type": "grain", "grain_file_type": "parquet", "grain_worker_count": 0,
    "tokenize_train_data": False, "train_data_columns": "['text']", "packing": True,
    "tokenizer_type": "huggingface", "add_bos": False,
    "add_eos": False, "enable_data_shuffling": False, "num_epoch": 1000,
}


def write_parquet(documents: Path, out: Path) -> dict:
    """documents.npz (tokens int32 [N], offsets int64 [D+1], vocab_size, eos_id, pad_id) ->
    out, one row per document, column `text` = list<int32>."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    with np.load(documents) as npz:
        tokens, offsets = npz["tokens"].astype(np.int32), npz["offsets"].astype(np.int64)
        meta = {k: int(npz[k]) for k in ("vocab_size", "eos_id", "pad_id")}
    column = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(tokens))
    pq.write_table(pa.table({"text": column}), out)
    return {**meta, "documents": len(offsets) - 1, "tokens": len(tokens)}


def write_tokenizer(vocab_size: int, eos_id: int, pad_id: int, out: Path) -> None:
    """A word-level tokenizer over `vocab_size` ids: MaxText only reads its special ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {eos_id: "<eos>", pad_id: "<pad>"}
    vocab = {names.get(i, f"<{i}>"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                            unk_token="<pad>").save_pretrained(str(out))


def maxtext_command(base_config: Path, work: Path, steps: int, model: dict,
                    extra: list[str]) -> list[str]:
    """`python -m maxtext.trainers.pre_train.train` with the CPU run settings, `model`
    (maxtext_settings), this run's files, then `extra` (last: they win)."""
    settings = {
        **RUN, **model, "run_name": "peer", "base_output_directory": str(work / "out"),
        "metrics_file": str(work / "metrics.jsonl"),
        "grain_train_files": str(work / "train.parquet"), "tokenizer_path": str(work / "tok"),
        "steps": steps,
    }
    return [sys.executable, "-m", "maxtext.trainers.pre_train.train", str(base_config),
            *(f"{k}={v}" for k, v in settings.items()), *extra]


def read_metrics(path: Path) -> tuple[list[float], list[float]]:
    """Per-step seconds and losses from MaxText's metrics_file (one JSON object a step)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["step"])
    return ([float(r["perf/step_time_seconds"]) for r in rows],
            [float(r["learning/loss"]) for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path,
                        help="hybridlm's config as JSON (ConfigDict.to_dict(); bench/train.py "
                        "writes it): the model, sequence length, batch and optimizer to run")
    parser.add_argument("--documents", required=True, type=Path,
                        help="npz of documents (bench/train.py writes it)")
    parser.add_argument("--steps", type=int, default=8,
                        help=f"steps to run; steps >= {FIRST_TIMED_STEP} are timed")
    parser.add_argument("--workdir", type=Path, help="default: a fresh temporary directory")
    parser.add_argument("extra", nargs="*", help="more MaxText key=value settings")
    args = parser.parse_args()
    if args.steps <= FIRST_TIMED_STEP:
        sys.exit(f"--steps must be > {FIRST_TIMED_STEP}: steps 0 and 1 are not timed")
    spec = importlib.util.find_spec("maxtext")
    if spec is None or spec.origin is None:
        sys.exit(f"{sys.executable} has no maxtext: build its environment with "
                 "bench/maxtext_setup.sh")
    base_config = Path(spec.origin).parent / "configs" / "base.yml"
    try:
        model = maxtext_settings(json.loads(args.config.read_text()))
    except ValueError as e:
        sys.exit(f"{args.config}: {e}")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="hybridlm-maxtext-"))
    work.mkdir(parents=True, exist_ok=True)
    data = write_parquet(args.documents, work / "train.parquet")
    if data["vocab_size"] != model["vocab_size"]:
        sys.exit(f"{args.documents}: vocab_size {data['vocab_size']} but the config's model "
                 f"has {model['vocab_size']}")
    write_tokenizer(data["vocab_size"], data["eos_id"], data["pad_id"], work / "tok")
    (work / "metrics.jsonl").unlink(missing_ok=True)
    cmd = maxtext_command(base_config, work, args.steps, model, args.extra)
    env = {**os.environ, "DECOUPLE_GCLOUD": "TRUE", "JAX_PLATFORMS": "cpu",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    log = work / "maxtext.log"
    start = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                            cwd=work).returncode
    wall_s = time.perf_counter() - start
    if rc != 0 or not (work / "metrics.jsonl").is_file():
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        sys.exit(f"{tail}\nMaxText failed (exit {rc}); full log: {log}")
    seconds, losses = read_metrics(work / "metrics.jsonl")
    timed = seconds[FIRST_TIMED_STEP:]
    if not timed:
        sys.exit(f"MaxText logged {len(seconds)} steps, none >= {FIRST_TIMED_STEP}: {log}")
    step_s = statistics.median(timed)
    tokens = model["per_device_batch_size"] * model["max_target_length"]
    print(json.dumps({
        "peer": "maxtext", "step_s": step_s, "tokens_per_s": tokens / step_s,
        "all_step_s": seconds, "timed_steps": f">= {FIRST_TIMED_STEP} (median)",
        "losses": losses, "seq_len": model["max_target_length"],
        "batch": model["per_device_batch_size"], "settings": model, "extra": args.extra,
        "data": data, "wall_s": wall_s, "maxtext": importlib.metadata.version("maxtext"),
        "jax": importlib.metadata.version("jax"), "python": sys.version.split()[0],
        "huge_pages": "hugetlb" in os.environ.get("GLIBC_TUNABLES", ""),
        "workdir": str(work), "command": cmd,
    }))


if __name__ == "__main__":
    main()
