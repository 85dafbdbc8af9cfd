"""The CPU default: a 4-layer RNoPE-SWA model on the built-in corpus, a few minutes here.

    hybridlm train                      # same as --config configs/tiny.py
    hybridlm train --config configs/tiny.py:variant=rope --workdir runs/tiny_rope
"""

from pathlib import Path

from hybridlm.config import from_file, parse_arg

PAPER = Path(__file__).with_name("paper.py")


def get_config(arg=None):
    arg = parse_arg(arg, variant="rnope_swa", seq_len=512, window=128)
    c = from_file(f"{PAPER}:variant={arg.variant},size=tiny,seq_len={arg.seq_len},"
                  f"window={arg.window}")
    c.train.steps = 200
    c.train.batch_size = 4
    c.train.warmup_steps = 20
    return c
