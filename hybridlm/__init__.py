"""hybridlm: long-context LM pretraining around the hybrid RoPE-SWA / NoPE attention stack."""

__version__ = "0.1.0"
