"""GPT-OSS attention: window-128 layers alternating with full layers, a learned sink logit
per head in every softmax. A dense MLP stands in for GPT-OSS's mixture of experts.

    hybridlm train --config configs/gpt_oss.py:size=tiny
size: tiny | 20b (the 20B attention shape; mlp_dim is one expert's width)
"""

from hybridlm.config import defaults, parse_arg, set_size


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", seq_len=1024, window=128)
    c = defaults()
    m = c.model
    if arg.size == "20b":
        (m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim,
         m.vocab_size) = (2880, 24, 64, 8, 64, 2880, 201088)
    else:
        set_size(m, arg.size)
        m.num_kv_heads = 2
    rope = {"rope": True, "rope_theta": 150_000.0, "sink": True}
    m.layer_types = {"local": {**rope, "window": arg.window}, "global": rope}
    m.pattern = "local,global"
    m.tie_embeddings = False
    c.data.seq_len = arg.seq_len
    return c
