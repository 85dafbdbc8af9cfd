"""MaxText itself as the measured peer: its pre-training loop at bench/train.py's shapes.

Runs under MaxText's own Python (3.12; bench/maxtext_setup.sh builds it), not hybridlm's:

    $MAXTEXT_PYTHON bench/peer_maxtext.py --documents docs.npz --seq-len 1024 --batch 4

bench/train.py --peer maxtext calls it after each case with the documents of that case's
corpus (token ids from hybridlm's own data pipeline, one array per document, at most
seq_len long). This script writes them to a local parquet file of pre-tokenised rows,
writes a word-level Hugging Face tokenizer of the same vocabulary (MaxText builds a
tokenizer even for pre-tokenised data, for its padding id), and runs
`python -m maxtext.trainers.pre_train.train` on the CPU with checkpointing, goodput and
TensorBoard off, packing on (first fit, as hybridlm packs), dense `dot_product` attention,
and the reference model: llama2 blocks (RMSNorm, RoPE, SwiGLU, no biases), d 256, 4 layers,
4 heads of 64, MLP 1024, tied embeddings, float32, AdamW (lr 3e-3, b2 0.95, decay 0.1,
clip 1.0). Extra `key=value` arguments go to MaxText last (they win).

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

# The reference model in MaxText's terms (bench/train.py: configs/paper.py size=tiny).
MODEL = {
    "decoder_block": "llama2", "base_emb_dim": 256, "base_num_decoder_layers": 4,
    "base_num_query_heads": 4, "base_num_kv_heads": 4, "head_dim": 64, "base_mlp_dim": 1024,
    "mlp_activations": "['silu','linear']", "logits_via_embedding": True,
    "dtype": "float32", "weight_dtype": "float32", "normalization_layer_epsilon": 1e-6,
    "learning_rate": 3e-3, "adam_b1": 0.9, "adam_b2": 0.95, "adam_weight_decay": 0.1,
    "gradient_clipping_threshold": 1.0, "warmup_steps_fraction": 0.1,
}
# Single-host CPU run with every cloud, checkpoint and monitoring feature off.
RUN = {
    "hardware": "cpu", "skip_jax_distributed_system": True, "enable_checkpointing": False,
    "enable_goodput_recording": False, "monitor_goodput": False, "enable_tensorboard": False,
    "gcs_metrics": False, "save_config_to_gcs": False, "profiler": "''", "jax_cache_dir": "''",
    "eval_interval": -1, "log_period": 1_000_000, "log_config": False,
    "dataset_type": "grain", "grain_file_type": "parquet", "grain_worker_count": 0,
    "tokenize_train_data": False, "train_data_columns": "['text']", "packing": True,
    "grain_packing_type": "first_fit", "tokenizer_type": "huggingface", "add_bos": False,
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


def maxtext_command(base_config: Path, work: Path, seq_len: int, batch: int, steps: int,
                    attention: str, remat: str, vocab_size: int, extra: list[str]) -> list[str]:
    settings = {
        **RUN, **MODEL, "run_name": "peer", "base_output_directory": str(work / "out"),
        "metrics_file": str(work / "metrics.jsonl"),
        "grain_train_files": str(work / "train.parquet"), "tokenizer_path": str(work / "tok"),
        "vocab_size": vocab_size, "max_target_length": seq_len,
        "per_device_batch_size": batch, "steps": steps, "attention": attention,
        "remat_policy": remat,
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
    parser.add_argument("--documents", required=True, type=Path,
                        help="npz of documents (bench/train.py writes it)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8,
                        help=f"steps to run; steps >= {FIRST_TIMED_STEP} are timed")
    parser.add_argument("--attention", default="dot_product", help="MaxText attention kernel")
    parser.add_argument("--remat", default="minimal",
                        help="MaxText remat_policy (STACK_NOTES: full and minimal time alike)")
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

    work = args.workdir or Path(tempfile.mkdtemp(prefix="hybridlm-maxtext-"))
    work.mkdir(parents=True, exist_ok=True)
    data = write_parquet(args.documents, work / "train.parquet")
    write_tokenizer(data["vocab_size"], data["eos_id"], data["pad_id"], work / "tok")
    (work / "metrics.jsonl").unlink(missing_ok=True)
    cmd = maxtext_command(base_config, work, args.seq_len, args.batch, args.steps,
                          args.attention, args.remat, data["vocab_size"], args.extra)
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
    print(json.dumps({
        "peer": "maxtext", "step_s": step_s,
        "tokens_per_s": args.batch * args.seq_len / step_s, "all_step_s": seconds,
        "timed_steps": f">= {FIRST_TIMED_STEP} (median)", "losses": losses,
        "seq_len": args.seq_len, "batch": args.batch, "attention": args.attention,
        "remat_policy": args.remat, "extra": args.extra, "data": data, "wall_s": wall_s,
        "maxtext": importlib.metadata.version("maxtext"),
        "jax": importlib.metadata.version("jax"), "python": sys.version.split()[0],
        "huge_pages": "hugetlb" in os.environ.get("GLIBC_TUNABLES", ""),
        "workdir": str(work), "command": cmd,
    }))


if __name__ == "__main__":
    main()
