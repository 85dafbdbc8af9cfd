"""SmolLM3: NoPE on every 4th layer, full causal attention everywhere, GQA, tied embeddings.

    hybridlm train --config configs/smollm3.py:size=tiny
size: tiny | 3b
"""

from hybridlm.config import defaults, parse_arg, set_size


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", seq_len=1024)
    c = defaults()
    m = c.model
    if arg.size == "3b":
        (m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim,
         m.vocab_size) = (2048, 36, 16, 4, 128, 11008, 128256)
    else:
        set_size(m, arg.size)
        m.num_kv_heads = 2
    m.layer_types = {"rope": {"rope": True, "rope_theta": 5_000_000.0},
                     "nope": {"rope": False}}
    m.pattern = "rope,rope,rope,nope"
    m.tie_embeddings = True
    c.data.seq_len = arg.seq_len
    return c
