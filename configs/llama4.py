"""Llama 4 text attention ("iRoPE"), with a dense MLP in place of Llama 4's mixture of experts.

RoPE layers (interleaved pairs, theta 500k) use chunked attention over 8192-token chunks and
an RMS q/k norm without weights after RoPE; every 4th layer is NoPE with full causal
attention and Llama 4's temperature tuning of q (floor 8192, scale 0.1).

    hybridlm train --config configs/llama4.py:size=tiny
size: tiny | scout (the Scout text shape; MoE not modelled: mlp_dim is the dense MLP width)
"""

from hybridlm.config import defaults, parse_arg, set_size


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", seq_len=1024, chunk=8192)
    c = defaults()
    m = c.model
    if arg.size == "scout":
        (m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim,
         m.vocab_size) = (5120, 48, 40, 8, 128, 16384, 202048)
    else:
        set_size(m, arg.size)
        m.num_kv_heads = 2
    chunk = arg.chunk if arg.size == "scout" or arg.chunk != 8192 else 256
    m.layer_types = {
        "chunked": {"rope": True, "rope_theta": 500_000.0, "rope_style": "interleaved",
                    "chunk": chunk, "qk_norm": "post_rope", "qk_norm_scale": False},
        "global": {"rope": False, "temperature_floor": chunk, "temperature_scale": 0.1},
    }
    m.pattern = "chunked,chunked,chunked,global"
    m.tie_embeddings, m.norm_eps = False, 1e-5
    c.data.seq_len = arg.seq_len
    return c
