"""The paper in miniature: RoPE against RNoPE-SWA, seeds, a context-extension stage.

    hybridlm sweep --sweep configs/experiments/paper_mini.py --launcher local --jobs 2 \
        --root runs/mini
    hybridlm sweep --sweep configs/experiments/paper_mini.py --root runs/mini --summarize \
        --report docs/experiments.md

Every variant trains `seeds` times (seeds change the parameters and the data order) as a
chain of stages, each starting from the previous one's parameters (train.init_from):

1. `<variant>_warm_s<seed>`: induction practice, `warm_steps` steps at `warm_len` tokens on
   random strings repeated (`retrieval:COUNT:CHARS:repeat`, and `repeat_ngram`, strings of 4
   characters, where only several characters locate the copy) with `warm_text` of the
   built-in corpus, at window `warm_window`. A model this small trained on needles alone sits
   on the loss plateau that precedes copying for thousands of steps (it answers the most
   common number); short rows of pure repetition give the look-back-and-copy circuit the
   densest signal for the least compute. The defaults are the reported sweep's (window 8,
   30% text): a window shorter than the repeat's distance leaves the copying to the
   full-attention layer, the one that must retrieve at length. The first sweep
   (`warm_window=64,warm_text=0`) and why its other seeds did not retrieve:
   docs/mini-diagnosis.md.
2. `<variant>_s<seed>`: `steps` steps at `seq_len` (window `window`) on the built-in corpus
   plus single-needle documents in the evaluation's format and both kinds of repeats
   (hybridlm/data/synthetic.py, training-split keys and values only). Evaluated at 1x, 2x,
   4x and 8x seq_len: needles with held-out and training-split values, RULER-style tasks,
   held-out loss by length, and the attention analysis at 1x and 4x.
3. `<variant>_ext_s<seed>` (when ext_steps > 0): the paper's context-extension stage,
   `ext_steps` more steps at `ext_factor` x seq_len, with RoPE theta raised to `ext_theta` for
   the full-attention RoPE layers (RNoPE-SWA's RoPE layers keep theta: their window does not
   grow), then the same evaluations.

`--jobs 2` runs two chains at a time, one per core of a 2-core CPU. The defaults are the CPU
miniature (a 0.2M-parameter model: d_model 64, 4 layers of 4 x 16 heads, byte vocabulary);
docs/experiments.md has its numbers and wall times. A GPU/TPU runs the same comparison at
scale with `size=` one of hybridlm/config.py MODEL_SIZES, e.g.

    --sweep configs/experiments/paper_mini.py:size=150m,seq_len=8192,window=1024,steps=20000

Arguments: variants ('+'-separated), seeds, size ('mini' or a MODEL_SIZES name), seq_len,
window, steps, batch, lr, warm_len, warm_steps, warm_batch, warm_window, warm_text (share of
text in the warm stage), needles (share of needle documents in stage 2), repeats (share of
repeat documents in stage 2), ngram (the share of all repeats that are `repeat_ngram`), ext_factor,
ext_steps (0: no extension stage), ext_theta, ext_lr, samples (needles per depth and length).
"""

from hybridlm.config import parse_arg

VARIANTS = "rope+rnope_swa"
BASE_THETA = 10_000.0  # configs/paper.py's RoPE theta
MINI = {"model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 4,
        "model.head_dim": 16, "model.mlp_dim": 256, "model.vocab_size": 260}
DOCUMENTS = 20_000  # synthetic documents per source (more than a miniature reads)


def evaluations(seq_len: int, samples: int) -> list[list[str]]:
    """Needles (5 depths x `samples` per length), RULER, held-out loss, attention analysis."""
    lengths = ",".join(str(seq_len * k) for k in (1, 2, 4, 8))
    return [["eval", "--task", "niah", "--lengths", lengths, "--samples", str(samples),
             "--quiet"],
            ["eval", "--task", "ruler", "--lengths", lengths, "--samples", "1", "--quiet"],
            ["eval", "--task", "ppl", "--lengths", lengths, "--quiet"],
            ["analyze", "--lengths", f"{seq_len},{seq_len * 4}", "--quiet"]]


def get_sweep(arg=None):
    arg = parse_arg(arg, variants=VARIANTS, seeds=3, size="mini", seq_len=256, window=64,
                    steps=1200, batch=8, lr=3e-3, warm_len=64, warm_steps=3000, warm_batch=16,
                    warm_window=8, warm_text=0.3, needles=0.6, repeats=0.25, ngram=0.0,
                    ext_factor=4, ext_steps=200,
                    ext_theta=100_000.0, ext_lr=1e-3, samples=20)
    size = MINI if arg.size == "mini" else {}
    model = f"configs/paper.py:size={'tiny' if arg.size == 'mini' else arg.size}"
    config = f"{model},window={arg.window}"
    common = {**size, "eval.steps": 4, "eval.every": 0, "checkpoint.every": 0, "log.every": 50}

    def repeats(length: int, share: float) -> tuple[list[str], list[float]]:
        return ([f"retrieval:{DOCUMENTS}:{length}:repeat",
                 f"retrieval:{DOCUMENTS}:{length}:repeat_ngram"],
                [share * (1 - arg.ngram), share * arg.ngram])

    def data(sources: list[str], weights: list[float]) -> dict:
        kept = [(s, w) for s, w in zip(sources, weights, strict=True) if w > 0]
        return {"data.source": ",".join(s for s, _ in kept),
                "data.weights": ",".join(f"{w:g}" for _, w in kept)}

    def mixture(length: int) -> dict:
        reps, rep_weights = repeats(length, arg.repeats)
        return data(["stdlib", f"retrieval:{DOCUMENTS}:{length}:niah_single", *reps],
                    [1 - arg.needles - arg.repeats, arg.needles, *rep_weights])

    def warm_mixture() -> dict:
        reps, rep_weights = repeats(arg.warm_len, 1 - arg.warm_text)
        return data([*reps, "stdlib"], [*rep_weights, arg.warm_text])

    points = []
    for variant in arg.variants.split("+"):
        for seed in range(arg.seeds):
            warm, base = f"{variant}_warm_s{seed}", f"{variant}_s{seed}"
            points.append({
                "name": warm, "config": f"{model},window={arg.warm_window},variant={variant},"
                                        f"seq_len={arg.warm_len}",
                **common, **warm_mixture(),
                "train.steps": arg.warm_steps, "train.batch_size": arg.warm_batch,
                "train.learning_rate": arg.lr, "train.warmup_steps": 30, "train.seed": seed})
            points.append({
                "name": base, "init_from": warm,
                "config": f"{config},variant={variant},seq_len={arg.seq_len}",
                **common, **mixture(arg.seq_len),
                "train.steps": arg.steps, "train.batch_size": arg.batch,
                "train.learning_rate": arg.lr, "train.warmup_steps": 30, "train.seed": seed,
                "after": evaluations(arg.seq_len, arg.samples)})
            if arg.ext_steps <= 0:
                continue
            ext_len = arg.seq_len * arg.ext_factor
            theta = arg.ext_theta if variant != "rnope_swa" else BASE_THETA
            points.append({
                "name": f"{variant}_ext_s{seed}", "init_from": base,
                "config": f"{config},variant={variant},seq_len={ext_len},theta={theta}",
                **common, **mixture(ext_len),
                "train.steps": arg.ext_steps,
                "train.batch_size": max(arg.batch // arg.ext_factor, 1),
                "train.learning_rate": arg.ext_lr,
                "train.warmup_steps": max(arg.ext_steps // 10, 1),
                "train.seed": seed, "after": evaluations(arg.seq_len, arg.samples)})
    return points
