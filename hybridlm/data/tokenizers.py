"""Tokenizers: bytes (always available), a byte-level BPE trained by `prepare`, or the user's
own `tokenizer.json` (HF `tokenizers`) or SentencePiece `.model`.

Every tokenizer has `name`, `vocab_size`, `bos_id` (put before each document when it is
prepared, as real pretraining data does: the first position of every document, and of every
evaluation prompt, is this token, where attention sinks form), `eos_id` (appended after each
document, so the model learns where documents end), `encode(text) -> int32 array`,
`encode_batch(texts)`, `decode(ids)` and `describe()`: the record stored with prepared data
and in the manifest, whose `fingerprint` says whether two tokenizers produce the same ids.

The byte tokenizer has its own BOS id. A user's tokenizer names its BOS with data.bos_token,
or one of the usual names is found (SentencePiece: its bos_id); a tokenizer without one
starts documents with its end-of-document token, as GPT-2 does with <|endoftext|>.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hybridlm.errors import ConfigError

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
BOS_CANDIDATES = ("<|startoftext|>", "<s>", "<bos>", "<|begin_of_text|>", "[CLS]")
BPE_SPECIALS = ("<|endoftext|>", "<|pad|>", "<|startoftext|>")  # ids 0-2 of a BPE trained here


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...
    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def describe(self) -> dict[str, Any]: ...


BYTE_VOCAB = 260  # 256 bytes + EOS, PAD, UNK, BOS


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then end-of-document, padding, unknown and
    beginning-of-document."""

    name = "byte"
    EOS, PAD, UNK, BOS = 256, 257, 258, 259
    eos_id, bos_id = EOS, BOS
    vocab_size = BYTE_VOCAB

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(
            np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def describe(self) -> dict[str, Any]:
        return {"spec": "byte", "type": "byte", "vocab_size": self.vocab_size,
                "bos_id": self.BOS, "eos_id": self.EOS, "fingerprint": "byte"}


class HFTokenizer:
    """A HF `tokenizers` tokenizer.json (a BPE trained by `prepare`, or the user's own)."""

    def __init__(self, path: str | Path, spec: str, eos_token: str = "", bos_token: str = ""):
        from tokenizers import Tokenizer as _HF

        self.path = Path(path)
        self.spec = spec
        self.name = spec
        try:
            self._tok = _HF.from_file(str(self.path))
        except Exception as e:  # the Rust side raises its own exception types
            raise ConfigError(f"data.tokenizer {spec!r}: {self.path} is not a readable "
                              f"tokenizer.json ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = _find_eos(spec, eos_token, self._tok.token_to_id)
        self.bos_id = _find_bos(spec, bos_token, self._tok.token_to_id, self.eos_id)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        out = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in out]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "type": "hf", "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id,
                "fingerprint": file_sha256(self.path)}


class SentencePieceTokenizer:
    """A SentencePiece `.model` the user brings (needs `pip install sentencepiece`)."""

    def __init__(self, path: str | Path, spec: str, eos_token: str = "", bos_token: str = ""):
        try:
            import sentencepiece
        except ImportError:
            raise ConfigError(f"data.tokenizer {spec!r} is a SentencePiece model, which needs "
                              "the sentencepiece package: pip install sentencepiece") from None
        self.path, self.spec, self.name = Path(path), spec, spec
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:
            raise ConfigError(f"data.tokenizer {spec!r}: {self.path} is not a readable "
                              f"SentencePiece model ({e})") from None
        self.vocab_size = int(self._sp.get_piece_size())
        eos = self._sp.eos_id()
        self.eos_id = _find_eos(spec, eos_token, self._sp.piece_to_id) if eos_token or eos < 0 \
            else int(eos)
        bos = self._sp.bos_id()
        self.bos_id = _find_bos(spec, bos_token, self._sp.piece_to_id, self.eos_id) \
            if bos_token or bos < 0 else int(bos)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "type": "sentencepiece", "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id,
                "fingerprint": file_sha256(self.path)}


def _find_eos(spec: str, eos_token: str, token_to_id) -> int:
    """The end-of-document id: data.eos_token if given, else the first common name found."""
    found = _find_token(spec, "eos_token", eos_token, EOS_CANDIDATES, token_to_id)
    if found is None:
        raise ConfigError(f"data.tokenizer {spec!r} has none of the usual end-of-document "
                          f"tokens {list(EOS_CANDIDATES)}; name its token with data.eos_token")
    return found


def _find_bos(spec: str, bos_token: str, token_to_id, eos_id: int) -> int:
    """The beginning-of-document id: data.bos_token if given, else the first common name
    found, else the end-of-document id (GPT-2's convention)."""
    found = _find_token(spec, "bos_token", bos_token, BOS_CANDIDATES, token_to_id)
    return eos_id if found is None else found


def _find_token(spec: str, field: str, given: str, candidates: Sequence[str],
                token_to_id) -> int | None:
    """The id of data.<field> (an error if the vocabulary lacks it), else of the first
    candidate name the vocabulary has, else None."""
    for name in (given,) if given else candidates:
        found = token_to_id(name)
        if found is not None and found >= 0:
            return int(found)
    if given:
        raise ConfigError(f"data.{field} {given!r} is not in the vocabulary of "
                          f"data.tokenizer {spec!r}")
    return None


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def parse_bpe_spec(spec: str) -> int | None:
    """'bpe:8192' -> 8192; None when spec is not a BPE-to-train spec."""
    if not spec.startswith("bpe"):
        return None
    _, _, size = spec.partition(":")
    try:
        vocab = int(size or 8192)
    except ValueError:
        raise ConfigError(f"data.tokenizer {spec!r}: write bpe:VOCAB, e.g. bpe:8192") from None
    if vocab < 256 + len(BPE_SPECIALS) + 1:
        raise ConfigError(f"data.tokenizer {spec!r}: a byte-level BPE needs a vocabulary of at "
                          f"least {256 + len(BPE_SPECIALS) + 1} (256 bytes, specials, merges)")
    return vocab


def static_vocab_size(spec: str) -> int | None:
    """The vocabulary a tokenizer spec implies without reading files (None: read the file)."""
    if spec == "byte":
        return BYTE_VOCAB
    return parse_bpe_spec(spec)


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path) -> None:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) and save it as tokenizer.json."""
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    Path(path).write_text(tok.to_str())


def load_file_tokenizer(spec: str, path: str | Path, eos_token: str = "",
                        bos_token: str = "") -> Tokenizer:
    """A tokenizer from a file: .model is SentencePiece, anything else a tokenizer.json."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.tokenizer {spec!r}: no such file {path}; give 'byte', "
                          "'bpe:VOCAB', a tokenizer.json or a SentencePiece .model")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path, spec, eos_token, bos_token)
    return HFTokenizer(path, spec, eos_token, bos_token)


def tokenizer_from_record(record: dict[str, Any], directory: Path) -> Tokenizer:
    """Rebuild the tokenizer a manifest recorded (its file is stored next to the manifest)."""
    if record["type"] == "byte":
        return ByteTokenizer()
    name = "tokenizer.model" if record["type"] == "sentencepiece" else "tokenizer.json"
    tok = load_file_tokenizer(record["spec"], directory / name)
    tok.eos_id = int(record["eos_id"])
    tok.bos_id = int(record["bos_id"])
    return tok


def get_tokenizer(spec: str, eos_token: str = "", bos_token: str = "") -> Tokenizer:
    """'byte' or a tokenizer file. A BPE to train ('bpe:N') comes from
    hybridlm.data.pipeline.load_tokenizer(cfg), which trains or finds it in the cache."""
    if spec == "byte":
        return ByteTokenizer()
    if parse_bpe_spec(spec) is not None:
        raise ConfigError(f"data.tokenizer {spec!r} is trained by `hybridlm prepare`; load it "
                          "with hybridlm.data.pipeline.load_tokenizer(cfg)")
    return load_file_tokenizer(spec, spec, eos_token, bos_token)
