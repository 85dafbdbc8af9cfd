"""The run's tokenizer as Hugging Face tokenizer files (tokenizer.json + tokenizer_config.json).

A tokenizer.json the run used (a BPE trained by `prepare`, or the user's own) is copied. The
built-in byte tokenizer is written as an equivalent tokenizer.json: a byte-level BPE with no
merges, so each UTF-8 byte b is token b, and ids 256-259 are its end-of-document, padding,
unknown and beginning-of-document tokens. A SentencePiece .model has no lossless
tokenizer.json form here, so no tokenizer files are written for it (the export says so).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import ml_collections as mlc

from hybridlm.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
BYTE_SPECIALS = {"<eos>": ByteTokenizer.EOS, "<pad>": ByteTokenizer.PAD,
                 "<unk>": ByteTokenizer.UNK, "<bos>": ByteTokenizer.BOS}  # in id order


def resolve(cfg: mlc.ConfigDict) -> Tokenizer | None:
    """The run's tokenizer when it can be written as tokenizer.json, else None."""
    spec = cfg.data.tokenizer
    if spec == "byte":
        return ByteTokenizer()
    if spec.endswith(".model"):
        return None
    from hybridlm.data.pipeline import load_tokenizer

    tok = load_tokenizer(cfg, progress=False)
    return tok if isinstance(tok, HFTokenizer) else None


def token_ids(tok: Tokenizer | None) -> dict[str, Any]:
    """bos/eos/pad ids for config.json (hybridlm documents start with bos, end with eos)."""
    pad = ByteTokenizer.PAD if isinstance(tok, ByteTokenizer) else None
    if isinstance(tok, HFTokenizer):
        pad = tok._tok.token_to_id("<|pad|>") or tok._tok.token_to_id("<pad>")
    return {"bos_token_id": None if tok is None else int(tok.bos_id),
            "eos_token_id": None if tok is None else int(tok.eos_id), "pad_token_id": pad}


def byte_tokenizer_json() -> str:
    """A tokenizers.Tokenizer that encodes exactly as hybridlm's ByteTokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True) for name in BYTE_SPECIALS])
    return tok.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel pre-tokenises to)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def write(tok: Tokenizer, out: Path, max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json for AutoTokenizer.from_pretrained(out)."""
    out = Path(out)
    if isinstance(tok, ByteTokenizer):
        (out / "tokenizer.json").write_text(byte_tokenizer_json())
        bos, eos, pad, unk = "<bos>", "<eos>", "<pad>", "<unk>"
        split = True  # hybridlm encodes the text "<eos>" as its 5 bytes, not as the token
    else:
        shutil.copyfile(tok.path, out / "tokenizer.json")
        bos, eos = tok._tok.id_to_token(tok.bos_id), tok._tok.id_to_token(tok.eos_id)
        pad = next((t for t in ("<|pad|>", "<pad>") if tok._tok.token_to_id(t) is not None),
                   None)
        unk, split = None, False  # hybridlm matches added tokens in text, as tokenizers does
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
              "pad_token": pad, "unk_token": unk, "bos_token": bos,
              "model_max_length": max_length, "clean_up_tokenization_spaces": False,
              "split_special_tokens": split}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def configure(cfg: mlc.ConfigDict, src: Path) -> None:
    """On import: data.tokenizer / data.eos_token / data.bos_token from the directory's
    tokenizer files."""
    src = Path(src)
    if not (src / "tokenizer.json").is_file():
        return
    cfg.data.tokenizer = str((src / "tokenizer.json").absolute())
    config_path = src / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    for field in ("eos_token", "bos_token"):
        token = config.get(field)
        if isinstance(token, dict):
            token = token.get("content")
        if token:
            cfg.data[field] = str(token)
