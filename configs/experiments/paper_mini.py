"""The paper in miniature: RoPE against RNoPE-SWA, seeds, a context-extension stage.

    hybridlm sweep --sweep configs/experiments/paper_mini.py --launcher local --jobs 2 \
        --root runs/mini
    hybridlm sweep --sweep configs/experiments/paper_mini.py --root runs/mini --summarize \
        --report docs/experiments.md

Every variant trains `seeds` times (points `<variant>_s<seed>`: seeds change the parameters
and the data order) at `seq_len` on the same mixture: the built-in corpus plus synthetic
retrieval documents in the evaluation's format (hybridlm/data/synthetic.py, training-split
keys and values only). Then the paper's context-extension stage (points
`<variant>_ext_s<seed>`): from the trained parameters (train.init_from), `ext_steps` more
steps at `ext_factor` x seq_len, with RoPE theta raised to `ext_theta` for the full-attention
RoPE layers (the paper raises the RoPE baseline's theta for long context; RNoPE-SWA's RoPE
layers keep theta, as their window does not grow). Each point then evaluates itself at 1x,
2x, 4x and 8x seq_len (needles with held-out and training-range values, RULER-style tasks,
held-out loss by length) and runs the attention analysis at 1x and 4x. `--jobs 2` runs two
chains (a point and its extension) at a time, one per core of a 2-core CPU.

The defaults are the CPU miniature: a 1.1M-parameter model (d_model 128, 4 layers of 4 x 32
heads, byte vocabulary) that learns to retrieve within ~10 minutes of one core; see
docs/experiments.md for the recipe, its evidence and wall times. A GPU/TPU runs the same
comparison at scale with `size=` one of hybridlm/config.py MODEL_SIZES, e.g.

    --sweep configs/experiments/paper_mini.py:size=150m,seq_len=8192,window=1024,steps=20000

Arguments: variants ('+'-separated), seeds, size ('mini' or a MODEL_SIZES name), seq_len,
window, steps, batch, lr, retrieval (share of retrieval documents, 0..1), ext_factor,
ext_steps, ext_theta, ext_lr.
"""

from hybridlm.config import parse_arg

VARIANTS = "rope+rnope_swa"
BASE_THETA = 10_000.0  # configs/paper.py's RoPE theta
MINI = {"model.d_model": 128, "model.num_heads": 4, "model.num_kv_heads": 4,
        "model.head_dim": 32, "model.mlp_dim": 512, "model.vocab_size": 260}


def evaluations(seq_len: int) -> list[list[str]]:
    """Needles (100 per length: +-0.1 intervals), RULER, held-out loss, attention analysis."""
    lengths = ",".join(str(seq_len * k) for k in (1, 2, 4, 8))
    return [["eval", "--task", "niah", "--lengths", lengths, "--quiet"],
            ["eval", "--task", "ruler", "--lengths", lengths, "--samples", "4", "--quiet"],
            ["eval", "--task", "ppl", "--lengths", lengths, "--quiet"],
            ["analyze", "--lengths", f"{seq_len},{seq_len * 4}", "--quiet"]]


def get_sweep(arg=None):
    arg = parse_arg(arg, variants=VARIANTS, seeds=3, size="mini", seq_len=512, window=64,
                    steps=600, batch=8, lr=3e-3, retrieval=0.8, ext_factor=4, ext_steps=100,
                    ext_theta=100_000.0, ext_lr=1e-3)
    ext_len = arg.seq_len * arg.ext_factor
    size = MINI if arg.size == "mini" else {}
    config = (f"configs/paper.py:size={'tiny' if arg.size == 'mini' else arg.size},"
              f"window={arg.window}")
    weights = f"{1 - arg.retrieval:g},{arg.retrieval:g}"
    mixture = {"data.source": f"stdlib,retrieval:20000:{arg.seq_len}", "data.weights": weights}
    ext_mixture = {"data.source": f"stdlib,retrieval:5000:{ext_len}", "data.weights": weights}
    points = []
    for variant in arg.variants.split("+"):
        for seed in range(arg.seeds):
            base = f"{variant}_s{seed}"
            points.append({
                "name": base,
                "config": f"{config},variant={variant},seq_len={arg.seq_len}",
                **size, **mixture,
                "train.steps": arg.steps, "train.batch_size": arg.batch,
                "train.learning_rate": arg.lr, "train.warmup_steps": max(arg.steps // 20, 1),
                "train.seed": seed, "eval.steps": 4, "checkpoint.every": 0,
                "after": evaluations(arg.seq_len)})
            theta = arg.ext_theta if variant != "rnope_swa" else BASE_THETA
            points.append({
                "name": f"{variant}_ext_s{seed}", "init_from": base,
                "config": f"{config},variant={variant},seq_len={ext_len},theta={theta}",
                **size, **ext_mixture,
                "train.steps": arg.ext_steps,
                "train.batch_size": max(arg.batch // arg.ext_factor, 1),
                "train.learning_rate": arg.ext_lr,
                "train.warmup_steps": max(arg.ext_steps // 10, 1),
                "train.seed": seed, "eval.steps": 4, "checkpoint.every": 0,
                "after": evaluations(arg.seq_len)})
    return points
