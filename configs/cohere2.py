"""Cohere2 (Command R7B / Command A): RNoPE-SWA as released.

Layer i is sliding-window iff (i + 1) % 4 != 0; RoPE (interleaved pairs, theta 50k) on the
sliding layers only; window 4096 keys including the query; parallel attention + MLP block
with Cohere's LayerNorm; tied embeddings; logits scaled by 0.25.

    hybridlm train --config configs/cohere2.py:size=tiny
size: tiny | r7b
"""

from hybridlm.config import defaults, parse_arg, set_size


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", seq_len=1024, window=4096)
    c = defaults()
    m = c.model
    if arg.size == "r7b":
        (m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim,
         m.vocab_size) = (4096, 32, 32, 8, 128, 14336, 256000)
    else:
        set_size(m, arg.size)
        m.num_kv_heads = 2
    window = arg.window if arg.size == "r7b" or arg.window != 4096 else 256
    m.layer_types = {
        "local": {"rope": True, "rope_theta": 50_000.0, "rope_style": "interleaved",
                  "window": window},
        "global": {"rope": False},
    }
    m.pattern = "local,local,local,global"
    m.block, m.norm, m.norm_eps = "parallel", "layernorm", 1e-5
    m.tie_embeddings, m.logit_scale = True, 0.25
    c.data.seq_len = arg.seq_len
    return c
