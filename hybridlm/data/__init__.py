"""Tokenizers, sources and input pipelines."""
