"""Held-out natural text for evaluation: the validation documents of the run's data source.

Haystacks and perplexity documents come from documents the model never trained on (the
validation split of `data.source`, chosen by name hash in hybridlm/data/sources.py), and
only from natural-text sources: generated retrieval documents (`retrieval:...`) carry other
needles, questions and answers, which would make a haystack a different task.
"""

from __future__ import annotations

import ml_collections as mlc
import numpy as np

from hybridlm.data.packing import PieceSource
from hybridlm.data.prepare import resolve
from hybridlm.data.sources import is_synthetic
from hybridlm.data.split import is_validation
from hybridlm.errors import ConfigError


def held_out_documents(cfg: mlc.ConfigDict, min_tokens: int = 1,
                       max_docs: int | None = None) -> list[np.ndarray]:
    """Validation documents of the natural-text sources with at least `min_tokens` tokens
    (BOS included, as trained), longest first."""
    _, sources = resolve(cfg.data, progress=False)
    docs: list[np.ndarray] = []
    for prepared, _ in sources:
        if is_synthetic(prepared.manifest["source"]):
            continue
        held = np.flatnonzero(is_validation(prepared.name_hashes, cfg.data.val_fraction))
        held = held[prepared.lengths[held] >= min_tokens]
        order = held[np.argsort(-prepared.lengths[held], kind="stable")]
        reader = PieceSource(prepared, np.zeros((0, 3), np.int64))
        for doc in order[:max_docs]:
            docs.append(reader.tokens(int(doc), 0, int(prepared.lengths[doc])))
    docs.sort(key=len, reverse=True)
    return docs[:max_docs] if max_docs else docs


def haystack(cfg: mlc.ConfigDict, tokenizer, min_tokens: int = 4096) -> np.ndarray:
    """Filler for needle prompts: the held-out natural documents without their BOS, joined
    by newlines, as the training haystacks join their files (hybridlm/data/synthetic.py)."""
    docs = held_out_documents(cfg)
    if not docs:
        raise ConfigError("data.source has no validation documents of natural text for "
                          "haystacks (generated retrieval documents never serve); add a text "
                          "source or raise data.val_fraction")
    newline = tokenizer.encode("\n")
    stream = np.concatenate([np.concatenate([d[1:] if d[0] == tokenizer.bos_id else d,
                                             newline]) for d in docs]).astype(np.int32)
    if len(stream) < min_tokens:
        stream = np.tile(stream, -(-min_tokens // len(stream)))
    return stream
