"""The paper's grid: variants x training sequence lengths, tokens per step held constant.

    hybridlm sweep --sweep configs/sweeps/context_length.py --launcher print --root runs/ctx
    hybridlm sweep --launcher local --root runs/ctx \
      --sweep configs/sweeps/context_length.py:variants=rope+rnope_swa,lengths=1024+2048,size=small

Arguments (lists are '+'-separated): variants, lengths, size, tokens_per_step, steps, window.
"""

from hybridlm.config import parse_arg


def get_sweep(arg=None):
    arg = parse_arg(arg, variants="rope+nope+qknorm+rnope+rnope_swa",
                    lengths="4096+8192+16384+32768+65536", size="1b",
                    tokens_per_step=1_048_576, steps=10_000, window=4096)
    points = []
    for variant in arg.variants.split("+"):
        for seq_len in (int(n) for n in str(arg.lengths).split("+")):
            batch = max(arg.tokens_per_step // seq_len, 1)
            points.append({
                "name": f"{variant}_{seq_len}",
                "config": f"configs/paper.py:variant={variant},size={arg.size},"
                          f"seq_len={seq_len},window={arg.window}",
                "train.batch_size": batch,
                "train.steps": arg.steps,
            })
    return points
