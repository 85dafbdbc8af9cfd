"""Interoperability: Hugging Face transformers checkpoints in and out (docs/interop.md)."""
