"""The train/validation split: a document's side follows from its name alone.

So a document stays on its side whatever else a source holds, on every host and in every
later `prepare`; every part that needs the split (prepare, the pipeline, held-out
evaluation, synthetic sources) reads it here.
"""

import hashlib


def name_hash(name: str) -> int:
    """A stable 63-bit hash of a document's name: the train/validation split uses it."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


def is_validation(hashes, fraction: float):
    """Documents whose name hash falls in the lowest `fraction` of the range are held out."""
    return hashes < int(fraction * 2**63)
