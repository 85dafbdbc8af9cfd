"""Held-out text for evaluation: the validation documents of the run's data source.

Haystacks and perplexity documents come from documents the model never trained on (the
validation split of `data.source`, chosen by name hash in hybridlm/data/sources.py).
"""

from __future__ import annotations

import ml_collections as mlc
import numpy as np

from hybridlm.data.packing import PieceSource
from hybridlm.data.prepare import resolve
from hybridlm.data.sources import is_validation
from hybridlm.errors import ConfigError


def held_out_documents(cfg: mlc.ConfigDict, min_tokens: int = 1,
                       max_docs: int | None = None) -> list[np.ndarray]:
    """Validation documents with at least `min_tokens` tokens, longest first."""
    _, sources = resolve(cfg.data, progress=False)
    docs: list[np.ndarray] = []
    for prepared, _ in sources:
        held = np.flatnonzero(is_validation(prepared.name_hashes, cfg.data.val_fraction))
        held = held[prepared.lengths[held] >= min_tokens]
        order = held[np.argsort(-prepared.lengths[held], kind="stable")]
        reader = PieceSource(prepared, np.zeros((0, 3), np.int64))
        for doc in order[:max_docs]:
            docs.append(reader.tokens(int(doc), 0, int(prepared.lengths[doc])))
    docs.sort(key=len, reverse=True)
    return docs[:max_docs] if max_docs else docs


def haystack(cfg: mlc.ConfigDict, eos_id: int, min_tokens: int = 4096) -> np.ndarray:
    """All held-out documents joined by end-of-document tokens (filler for needle tasks)."""
    docs = held_out_documents(cfg)
    if not docs:
        raise ConfigError("the data source has no validation documents for haystacks; raise "
                          "data.val_fraction")
    stream = np.concatenate([np.append(d, np.int32(eos_id)) for d in docs]).astype(np.int32)
    if len(stream) < min_tokens:
        stream = np.tile(stream, -(-min_tokens // len(stream)))
    return stream
