"""Gemma 3 attention: 5 local layers (window 1024, RoPE theta 10k) to 1 global (theta 1M),
RoPE everywhere, QK-norm before RoPE, GeGLU MLP.

Gemma 3's depths are not multiples of 6; the remaining layers take the pattern's first
entries (local), as Gemma does. Gemma's sandwich norms and embedding scaling are not
modelled: the attention stack is the point here.

    hybridlm train --config configs/gemma3.py:size=tiny
size: tiny | 4b
"""

from hybridlm.config import defaults, parse_arg, set_size


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", seq_len=1024, window=1024)
    c = defaults()
    m = c.model
    if arg.size == "4b":
        (m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim,
         m.vocab_size) = (2560, 34, 8, 4, 256, 10240, 262144)
    else:
        set_size(m, arg.size)
        m.num_layers, m.num_kv_heads = 8, 2  # one full group of 6 plus 2 remaining layers
    window = arg.window if arg.size == "4b" or arg.window != 1024 else 128
    m.layer_types = {
        "local": {"rope": True, "rope_theta": 10_000.0, "window": window, "qk_norm": "pre_rope"},
        "global": {"rope": True, "rope_theta": 1_000_000.0, "qk_norm": "pre_rope"},
    }
    m.pattern = "local,local,local,local,local,global"
    m.allow_partial_pattern = True
    m.activation = "gelu"
    c.data.seq_len = arg.seq_len
    return c
