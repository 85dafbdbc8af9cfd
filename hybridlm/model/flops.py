"""Analytic parameter and FLOP counts, for MFU and for sizing runs before paying for them.

Training FLOPs per token = 6 * N_matmul + sum over layers of 12 * H * D * keys(layer),
the PaLM accounting: every weight that multiplies an activation costs 2 FLOPs per token
forward and 4 backward (N_matmul counts the LM head, tied or not, but not the embedding
lookup or norm scales), and attention costs 2 matmuls of 2 * H * D FLOPs per visible key,
times 3 for forward + backward. keys(layer) is the number of keys a query sees, averaged
over the positions of a sequence: (T + 1) / 2 for full causal attention, about W for a
window W << T, about C / 2 for chunks of C. That is where the hybrid stack saves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hybridlm.model.pattern import LayerSpec, expand
from hybridlm.ops.masks import MaskRule


def _layer_params(cfg: Mapping[str, Any], spec: LayerSpec) -> tuple[int, int]:
    """(matmul parameters, other parameters) of one block."""
    d, h, hkv, hd, f = (cfg["d_model"], cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"],
                        cfg["mlp_dim"])
    matmul = d * h * hd + d * 2 * hkv * hd + h * hd * d + d * 2 * f + f * d
    norms = d if cfg["block"] == "parallel" else 2 * d
    qk_norm = 2 * hd if spec.qk_norm != "none" and spec.qk_norm_scale else 0
    sink = h if spec.sink else 0
    return matmul, norms + qk_norm + sink


def layers(cfg: Mapping[str, Any]) -> list[LayerSpec]:
    return expand(cfg["layer_types"], cfg["pattern"], cfg["num_layers"])


def param_count(cfg: Mapping[str, Any]) -> int:
    """Exact number of parameters the model config builds."""
    embed = cfg["vocab_size"] * cfg["d_model"]
    head = 0 if cfg["tie_embeddings"] else embed
    per_layer = sum(sum(_layer_params(cfg, spec)) for spec in layers(cfg))
    return embed + head + per_layer + cfg["d_model"]  # + final norm


def matmul_param_count(cfg: Mapping[str, Any]) -> int:
    """Parameters that multiply activations: the N of 6N (LM head included, tied or not)."""
    head = cfg["vocab_size"] * cfg["d_model"]
    return head + sum(_layer_params(cfg, spec)[0] for spec in layers(cfg))


def mean_visible_keys(seq_len: int, rule: MaskRule) -> float:
    """Keys a query sees, averaged over positions 0..seq_len-1 (the mask rule's own
    count, `MaskRule.visible_key_counts`)."""
    return float(rule.visible_key_counts(seq_len).mean())


def attention_flops_per_token(cfg: Mapping[str, Any], seq_len: int) -> float:
    """Training (forward + backward) attention FLOPs per token, summed over layers."""
    width = cfg["num_heads"] * cfg["head_dim"]
    return sum(12.0 * width * mean_visible_keys(seq_len, spec.mask)
               for spec in layers(cfg))


def flops_per_token(cfg: Mapping[str, Any], seq_len: int) -> float:
    """Training FLOPs per token at sequence length seq_len: 6N + attention."""
    return 6.0 * matmul_param_count(cfg) + attention_flops_per_token(cfg, seq_len)
