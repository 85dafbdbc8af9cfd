"""The paper in miniature: the variants it compares, trained alike, then measured alike.

    hybridlm sweep --sweep configs/experiments/paper_mini.py --launcher local --root runs/mini
    hybridlm sweep --sweep configs/experiments/paper_mini.py --root runs/mini --summarize

Every point trains configs/paper.py at one size on the same mixture (the built-in corpus plus
synthetic retrieval documents from the evaluation's generators, train content only:
hybridlm/data/synthetic.py), with the same seed, batch and steps (the same tokens), then runs
the evaluation and the attention analysis on its own checkpoint (the point's "after"
commands). Defaults fit a 2-core CPU in about an hour; a GPU/TPU run is one argument away:

    --sweep configs/experiments/paper_mini.py:size=150m,seq_len=8192,window=1024,steps=20000

Arguments: variants ('+'-separated), size, seq_len, window, steps, batch, retrieval (share of
retrieval documents in the mixture, 0..1), seed.
"""

from hybridlm.config import parse_arg

VARIANTS = "rope+nope+qknorm+rnope+rnope_swa"


def get_sweep(arg=None):
    arg = parse_arg(arg, variants=VARIANTS, size="tiny", seq_len=512, window=128, steps=100,
                    batch=16, retrieval=0.5, seed=0)
    lengths = ",".join(str(arg.seq_len * k) for k in (1, 2, 4, 8))
    mixture = {"data.source": f"stdlib,retrieval:20000:{arg.seq_len}",
               "data.weights": f"{1 - arg.retrieval},{arg.retrieval}"}
    points = []
    for variant in arg.variants.split("+"):
        points.append({
            "name": variant,
            "config": f"configs/paper.py:variant={variant},size={arg.size},"
                      f"seq_len={arg.seq_len},window={arg.window}",
            **mixture,
            "train.steps": arg.steps,
            "train.batch_size": arg.batch,
            "train.warmup_steps": max(arg.steps // 10, 1),
            "train.seed": arg.seed,
            "after": [
                ["eval", "--task", "all", "--lengths", lengths],
                ["analyze", "--lengths", f"{arg.seq_len},{arg.seq_len * 4}"],
            ],
        })
    return points
