"""Flax NNX model code: no mesh, no kernel choice, only logical axis names."""

from hybridlm.model.flops import flops_per_token, matmul_param_count, param_count
from hybridlm.model.pattern import LayerSpec, expand, layer_defaults, parse_pattern
from hybridlm.model.transformer import Transformer, abstract_model

__all__ = ["LayerSpec", "Transformer", "abstract_model", "expand", "flops_per_token",
           "layer_defaults", "matmul_param_count", "param_count", "parse_pattern"]
