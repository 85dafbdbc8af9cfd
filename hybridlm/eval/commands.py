"""The bodies of `hybridlm eval`, `hybridlm analyze` and `hybridlm generate`.

Each is a function of (cfg, model) so it runs on a model restored from a checkpoint (the
CLI) or on one built in memory (tests). Results go to `out_dir` (the CLI: `W/eval/`) as JSON
with a top-level "summary" of scalars (what sweep summaries read), plus PNG plots; the
analysis also writes a markdown table shaped like the paper's.

Default lengths are 1x, 2x and 4x the trained `data.seq_len`: at the training length, and
beyond it (the point of NoPE layers).

In a multi-process job every process runs the same body on the same inputs (the model's
arrays span all processes' devices, so every forward pass is a collective), and process 0
alone writes the files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx
from tqdm import tqdm

from hybridlm.errors import ConfigError
from hybridlm.eval import analysis, heldout, perplexity, plots, retrieval, scoring, tasks
from hybridlm.eval.analysis_math import SEGMENTS
from hybridlm.infer import Generator, cache_bytes
from hybridlm.model.transformer import Transformer
from hybridlm.ops.cross_entropy import softmax_cross_entropy

NIAH_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
RULER_DEPTHS = (0.1, 0.5, 0.9)
MIN_LENGTH = 128  # shorter contexts leave no room for haystack around needle and question
# per cell / documents; niah: 5 depths x 20 = 100 samples per length, so that the 95% Wilson
# interval of a needle score is +-0.1 or narrower at any score
DEFAULT_SAMPLES = {"niah": 20, "ruler": 8, "ppl": 16, "analyze": 16}
EVAL_TASKS = ("niah", "ruler", "ppl")


# ---- inputs --------------------------------------------------------------------------------

def default_lengths(cfg: mlc.ConfigDict) -> list[int]:
    """At the training length and beyond it: 1x, 2x, 4x data.seq_len."""
    return [cfg.data.seq_len * m for m in (1, 2, 4)]


def check_grid(lengths: Sequence[int], depths: Sequence[float] = (), samples: int = 1) -> None:
    """Reject a bad --lengths / --depths / --samples before anything is compiled."""
    if not lengths:
        raise ConfigError("--lengths is empty; give context lengths in tokens, e.g. 512 1024")
    for n in lengths:
        if int(n) < MIN_LENGTH:
            raise ConfigError(f"--lengths: {n} is too short; each length must be at least "
                              f"{MIN_LENGTH} tokens")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ConfigError(f"--depths: {d} is not a fraction in [0, 1]")
    if samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {samples}")


def _tokenizer(cfg: mlc.ConfigDict, model_cfg: dict):
    from hybridlm.data.prepare import resolve_tokenizer

    tokenizer = resolve_tokenizer(cfg.data, progress=False)
    if tokenizer.vocab_size > model_cfg["vocab_size"]:
        raise ConfigError(f"the tokenizer ({cfg.data.tokenizer!r}) has {tokenizer.vocab_size} "
                          f"ids but the model only {model_cfg['vocab_size']} embeddings")
    return tokenizer


def writes_files() -> bool:
    """Process 0 writes results and plots; the other processes of a job compute only."""
    return jax.process_index() == 0


def _write(out_dir: Path, name: str, result: dict) -> Path:
    path = out_dir / name
    if writes_files():
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def _plot(draw, *args, **kwargs) -> None:
    """A plots.* call, on process 0 only."""
    if writes_files():
        draw(*args, **kwargs)


class Decoder:
    """Greedy continuations of a batch of equal-length prompts (retrieval.GenerateFn). One
    Generator, with a KV cache sized to it, per maximum length (rounded up to `bucket`) and
    batch size (rounded up to a power of two by repeating the last prompt, so that a grid's
    batches share a few compiles); prompts prefill in multiples of `prefill_multiple`
    tokens so that samples of many lengths share compiles too."""

    def __init__(self, model: Transformer, model_cfg: dict, bucket: int = 256,
                 prefill_multiple: int = 64):
        self.model, self.model_cfg, self.bucket = model, model_cfg, bucket
        self.prefill_multiple = prefill_multiple
        self.generators: dict[tuple[int, int], Generator] = {}

    def __call__(self, prompts: np.ndarray, new: int) -> np.ndarray:
        prompts = np.asarray(prompts)
        b, n = prompts.shape
        padded = 1 << (b - 1).bit_length()
        rows = np.concatenate([prompts, np.repeat(prompts[-1:], padded - b, axis=0)])
        max_len = -(-(n + new) // self.bucket) * self.bucket
        if (max_len, padded) not in self.generators:
            self.generators[max_len, padded] = Generator(
                self.model, self.model_cfg, padded, max_len, self.prefill_multiple)
        return self.generators[max_len, padded].generate(rows, new)[:b]


# ---- eval: needles, RULER-style tasks, loss by position ------------------------------------

def _retrieval_setup(cfg: mlc.ConfigDict, lengths, depths, samples):
    """Checked grid lengths, the model config, the run's tokenizer and a held-out haystack."""
    lengths = list(lengths or default_lengths(cfg))
    check_grid(lengths, depths, samples)
    model_cfg = cfg.model.to_dict()
    tokenizer = _tokenizer(cfg, model_cfg)
    return lengths, model_cfg, tokenizer, heldout.haystack(cfg, tokenizer,
                                                            min_tokens=max(lengths))


def eval_niah(cfg: mlc.ConfigDict, model: Transformer, out_dir: Path, *,
              lengths: Sequence[int] | None = None, depths: Sequence[float] = NIAH_DEPTHS,
              samples: int = DEFAULT_SAMPLES["niah"], seed: int = 0, step: int | None = None,
              progress: bool = True) -> dict:
    """Single-needle grid (lengths x depths), exact match; niah.json and niah.png.

    Keys and values from the held-out split (the result's top level, "niah_*" in the
    summary) and, on the same haystacks, from the training split ("train_values",
    "niah_train_*"), each with Wilson intervals by length ("interval") and chance level."""
    lengths, model_cfg, tokenizer, hay = _retrieval_setup(cfg, lengths, depths, samples)
    decode = Decoder(model, model_cfg)
    result, train = (retrieval.run_task("niah_single", decode, tokenizer, hay, lengths,
                                        list(depths), samples, seed, progress, split)
                     for split in ("heldout", "train"))
    summary = {}
    for prefix, r in (("niah", result), ("niah_train", train)):
        summary.update({f"{prefix}_{n}": r["by_length"][str(n)] for n in lengths})
        summary[prefix] = r["mean"]
    result.update(step=step, train_len=cfg.data.seq_len, train_values=train, summary=summary)
    _plot(plots.needle_heatmap, np.array(result["grid"]), lengths, list(depths),
          out_dir / "niah.png", title=f"needle in a haystack (step {step})",
          train_len=cfg.data.seq_len)
    _write(out_dir, "niah.json", result)
    return result


def eval_ruler(cfg: mlc.ConfigDict, model: Transformer, out_dir: Path, *,
               lengths: Sequence[int] | None = None, depths: Sequence[float] = RULER_DEPTHS,
               samples: int = DEFAULT_SAMPLES["ruler"], seed: int = 0, step: int | None = None,
               progress: bool = True) -> dict:
    """Every RULER-style task at every length; ruler.json and ruler.png (score by length)."""
    lengths, model_cfg, tokenizer, hay = _retrieval_setup(cfg, lengths, depths, samples)
    decode = Decoder(model, model_cfg)
    by_task = {task: retrieval.run_task(task, decode, tokenizer, hay, lengths, list(depths),
                                        samples, seed, progress)
               for task in tqdm(tasks.RULER_TASKS, desc="ruler", disable=not progress)}
    summary = {f"{task}_{n}": r["by_length"][str(n)] for task, r in by_task.items()
               for n in lengths}
    summary.update({f"ruler_{n}": float(np.mean([r["by_length"][str(n)]
                                                 for r in by_task.values()])) for n in lengths})
    summary["ruler"] = float(np.mean([r["mean"] for r in by_task.values()]))
    _plot(plots.lines_by_length, {t: [r["by_length"][str(n)] for n in lengths]
                                  for t, r in by_task.items()}, lengths, out_dir / "ruler.png",
          "score", f"RULER-style tasks (step {step})", cfg.data.seq_len)
    n = sum(r["n_per_length"] for r in by_task.values())  # all tasks' samples of a length
    interval = {str(k): list(scoring.wilson(summary[f"ruler_{k}"] * n, n)) for k in lengths}
    result = {"step": step, "train_len": cfg.data.seq_len, "lengths": lengths,
              "depths": list(depths), "per_cell": samples, "seed": seed, "summary": summary,
              "interval": interval,
              "chance": float(np.mean([r["chance"] for r in by_task.values()])),
              "tasks": by_task}
    _write(out_dir, "ruler.json", result)
    return result


def next_token_losses(model: Transformer):
    """tokens [B, T + 1] -> float32 next-token losses [B, T], computed on the model's devices
    and replicated, so that every process of a job can read all B rows."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def losses(state, tokens):
        logits = nnx.merge(graphdef, state)(tokens[:, :-1]).astype(jax.numpy.float32)
        out = softmax_cross_entropy(logits, tokens[:, 1:])[0]
        if jax.sharding.get_abstract_mesh().empty:
            return out
        return jax.lax.with_sharding_constraint(out, jax.sharding.PartitionSpec())

    return lambda tokens: losses(state, tokens)


def _batch_rows() -> int:
    """Documents per forward pass: one per data replica of the current mesh (1 without)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else mesh.shape["data"] * mesh.shape["fsdp"]


def eval_ppl(cfg: mlc.ConfigDict, model: Transformer, out_dir: Path, *,
             lengths: Sequence[int] | None = None, samples: int = DEFAULT_SAMPLES["ppl"],
             step: int | None = None, progress: bool = True) -> dict:
    """Loss by position on up to `samples` held-out documents per length; ppl.json, ppl.png.
    A length no held-out document reaches is reported with "documents": 0 and skipped."""
    lengths = list(lengths or default_lengths(cfg))
    check_grid(lengths, (), samples)
    losses, batch = next_token_losses(model), _batch_rows()
    docs = heldout.held_out_documents(cfg, min_tokens=min(lengths) + 1)
    rows, curves = [], {}
    for n in tqdm(lengths, desc="ppl", disable=not progress):
        usable = [d for d in docs if len(d) > n][:samples]
        if not usable:
            rows.append({"length": n, "documents": 0, "buckets": [], "mean_loss": None})
            continue
        row = perplexity.loss_by_position(losses, usable, n, batch)
        rows.append(row)
        curves[f"{n} tokens"] = ([b["center"] for b in row["buckets"]],
                                 [b["loss"] for b in row["buckets"]])
    if not curves:
        raise ConfigError(f"no held-out document is longer than {min(lengths)} tokens; pass "
                          "shorter --lengths or raise data.val_fraction")
    summary = {f"loss_{r['length']}": r["mean_loss"] for r in rows if r["documents"]}
    summary.update({f"loss_last_bucket_{r['length']}": r["buckets"][-1]["loss"]
                    for r in rows if r["documents"]})
    _plot(plots.loss_by_position, curves, out_dir / "ppl.png", train_len=cfg.data.seq_len,
          title=f"held-out loss by position (step {step})")
    result = {"step": step, "train_len": cfg.data.seq_len, "summary": summary, "lengths": rows}
    _write(out_dir, "ppl.json", result)
    return result


def run_eval(cfg: mlc.ConfigDict, model: Transformer, out_dir: Path, task: str, *,
             lengths: Sequence[int] | None = None, depths: Sequence[float] | None = None,
             samples: int | None = None, seed: int = 0, step: int | None = None,
             progress: bool = True) -> dict[str, dict]:
    """`hybridlm eval --task niah|ruler|ppl|all` (or several, comma-separated): the named
    evaluations, in the order of EVAL_TASKS."""
    asked = task.split(",")
    if any(t not in (*EVAL_TASKS, "all") for t in asked):
        raise ConfigError(f"--task {task!r}: choose from {', '.join((*EVAL_TASKS, 'all'))} "
                          "(several comma-separated)")
    names = [n for n in EVAL_TASKS if n in asked or "all" in asked]
    check_grid(lengths or default_lengths(cfg), depths or (), 1 if samples is None else samples)
    out = {}
    for name in names:
        kw: dict[str, Any] = dict(lengths=lengths, step=step, progress=progress,
                                  samples=DEFAULT_SAMPLES[name] if samples is None
                                  else samples)
        if name != "ppl":
            kw.update(seed=seed, depths=depths or (NIAH_DEPTHS if name == "niah"
                                                   else RULER_DEPTHS))
        out[name] = {"niah": eval_niah, "ruler": eval_ruler, "ppl": eval_ppl}[name](
            cfg, model, out_dir, **kw)
    return out


# ---- analyze: the paper's attention-mass table ----------------------------------------------

def layer_label(row: dict) -> str:
    """'local (RoPE, window 128)' from a per-layer row of analysis.analyze_sample."""
    span = (f"window {row['window']}" if row["window"] else
            f"chunk {row['chunk']}" if row["chunk"] else "full")
    return f"{row['type']} ({'RoPE' if row['rope'] else 'NoPE'}, {span})"


def analysis_markdown(result: dict) -> str:
    """Tables like the paper's: per layer type and overall, then per layer, for each length."""
    cols = (*SEGMENTS, "entropy")
    head = ("| length | layers | " + " | ".join(cols) + " |\n|---|---|"
            + "---|" * len(cols) + "\n")

    def line(n, label, d):
        return f"| {n} | {label} | " + " | ".join(
            f"{d[c]:.4f} ({d['uniform'][c]:.4f})" for c in cols) + " |\n"

    text = ["Attention of the question + answer tokens (queries), summed over key segments, "
            "averaged over heads, queries and samples; entropy in nats; in brackets what "
            "uniform attention over the keys each query sees would give. Step "
            f"{result['step']}, needle at {result['depth']:.0%} depth, "
            f"{result['samples']} samples per length.\n\n", head]
    for r in result["lengths"]:
        labels = {row["type"]: layer_label(row) for row in r["per_layer"]}
        counts = {t: sum(row["type"] == t for row in r["per_layer"]) for t in labels}
        for t, masses in r["by_type"].items():
            text.append(line(r["length"], f"{labels[t]} x{counts[t]}", masses))
        text.append(line(r["length"], "all layers", r["overall"]))
    text.append("\nPer layer:\n\n" + head)
    for r in result["lengths"]:
        for row in r["per_layer"]:
            text.append(line(r["length"], f"{row['layer']}: {layer_label(row)}", row))
    return "".join(text)


def run_analysis(cfg: mlc.ConfigDict, model: Transformer, out_dir: Path, *,
                 lengths: Sequence[int] | None = None,
                 samples: int = DEFAULT_SAMPLES["analyze"], depth: float = 0.5, seed: int = 0,
                 step: int | None = None, progress: bool = True) -> dict:
    """Needle at `depth`; analysis.json, analysis.md and analysis.png (stacked segment bars)."""
    lengths = list(lengths or default_lengths(cfg))
    check_grid(lengths, (depth,), samples)
    model_cfg = cfg.model.to_dict()
    tokenizer = _tokenizer(cfg, model_cfg)
    hay = heldout.haystack(cfg, tokenizer, min_tokens=max(lengths))
    per_length = []
    for n in lengths:
        cell = tasks.make_samples("niah_single", tokenizer, hay, [n], [depth], samples, seed)
        answers = [tokenizer.encode(s.answer) for s in cell]
        num_queries = max(len(s.ids) + len(a) - s.question_span[0]
                          for s, a in zip(cell, answers, strict=True))
        results = [analysis.analyze_sample(model, s, a, num_queries) for s, a in
                   tqdm(list(zip(cell, answers, strict=True)), desc=f"analyze {n}",
                        disable=not progress, leave=False)]
        per_length.append({**analysis.average(results), "length": n})
    summary = {}
    for r in per_length:
        for t, masses in [*r["by_type"].items(), ("all", r["overall"])]:
            for seg in (*SEGMENTS, "entropy"):
                summary[f"{seg}_{t}_{r['length']}"] = masses[seg]
                summary[f"uniform_{seg}_{t}_{r['length']}"] = masses["uniform"][seg]
    result = {"step": step, "train_len": cfg.data.seq_len, "depth": depth, "samples": samples,
              "seed": seed, "summary": summary, "lengths": per_length}
    bars = {f"{r['length']} {t}": {s: m[s] for s in SEGMENTS}
            for r in per_length for t, m in [*r["by_type"].items(), ("all", r["overall"])]}
    _plot(plots.segment_bars, bars, out_dir / "analysis.png",
          title=f"attention mass of the question tokens (step {step})")
    _write(out_dir, "analysis.json", result)
    if writes_files():
        (out_dir / "analysis.md").write_text(analysis_markdown(result))
    return result


# ---- generate ---------------------------------------------------------------------------------

def generate_text(cfg: mlc.ConfigDict, model: Transformer, prompt: str, *, max_new: int = 64,
                  temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> dict:
    """Continue `prompt`; also the KV cache's bytes next to a full-attention cache's."""
    if max_new < 1:
        raise ConfigError(f"--max_new must be at least 1, got {max_new}")
    if temperature < 0 or top_k < 0:
        raise ConfigError("--temperature and --top_k must be >= 0")
    model_cfg = cfg.model.to_dict()
    tokenizer = _tokenizer(cfg, model_cfg)
    ids = tokenizer.encode(prompt)
    if len(ids) == 0:
        raise ConfigError("--prompt is empty; give some text to continue")
    ids = np.concatenate([[tokenizer.bos_id], ids]).astype(np.int32)  # as documents start
    max_len = len(ids) + max_new
    out = Generator(model, model_cfg, 1, max_len).generate(
        ids[None], max_new, temperature=temperature, top_k=top_k, seed=seed)[0]
    itemsize = jax.numpy.dtype(model_cfg["dtype"]).itemsize
    return {"prompt": prompt, "text": tokenizer.decode(out), "tokens": out.tolist(),
            "max_len": max_len, "cache": cache_bytes(model_cfg, 1, max_len, itemsize),
            "cache_128k": cache_bytes(model_cfg, 1, 128 * 1024, itemsize)}
