"""SWAN-GPT: a global NoPE layer first, then 3 sliding-window RoPE layers (window 512).

SWAN-GPT also rescales NoPE queries by a log-length factor at inference beyond the training
length; that is an evaluation-time option, not part of the trained architecture here.

    hybridlm train --config configs/swan_gpt.py:size=tiny
size: tiny | small | 150m | 1b | 8b
"""

from hybridlm.config import defaults, parse_arg, set_size


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", seq_len=1024, window=512)
    c = defaults()
    set_size(c.model, arg.size)
    c.model.layer_types = {
        "global": {"rope": False},
        "local": {"rope": True, "rope_theta": 10_000.0, "window": arg.window},
    }
    c.model.pattern = "global,local,local,local"
    c.data.seq_len = arg.seq_len
    return c
