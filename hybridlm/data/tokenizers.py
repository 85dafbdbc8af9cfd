"""Tokenizers. The byte-level one needs no files and always works."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then end-of-document, padding and unknown."""

    name = "byte"
    EOS, PAD, UNK = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(
            np.int32)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


def get_tokenizer(name: str) -> ByteTokenizer:
    if name == "byte":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; available: 'byte'")
