"""`hybridlm prepare`: tokenise a source once into ArrayRecord shards plus a manifest.

A prepared directory holds
  tokens-NNNNN.array_record   records of at most RECORD_TOKENS consecutive tokens of one
                              document, its BOS first (so reading a piece of a long document
                              reads only the records it overlaps), uint16 or uint32
                              (see manifest "dtype")
  index.npz                   per document: length, first record, name hash (the split)
  documents.txt               per document: its name (file, file:line or file#row)
  tokenizer.json / .model     the tokenizer's file, when it has one
  manifest.json               source, tokenizer record, documents, tokens, skips, histogram
It is written to a temporary folder and renamed into place, so a crash or a second process
preparing the same data never leaves a half-written directory behind.

Raw sources are prepared into the cache (data.cache_dir, else $HYBRIDLM_CACHE, else
~/.cache/hybridlm) under a key of the source's files (paths, sizes, mtimes) and the
tokenizer (its BOS id too), so `hybridlm train` prepares the built-in corpus on first use
and reuses it. The key and the manifest carry PREPARE_VERSION: data prepared by an older
format (version 1 had no BOS) is neither found in the cache nor read from a directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections as mlc
import numpy as np

from hybridlm.data import sources as sources_lib
from hybridlm.data import split
from hybridlm.data import tokenizers as tok_lib
from hybridlm.errors import ConfigError

PREPARE_VERSION = 2  # 2: every document starts with the tokenizer's BOS
RECORD_TOKENS = 4096  # tokens per ArrayRecord record
SHARD_BYTES = 256 << 20  # start a new shard after this many bytes of tokens
BPE_TRAIN_BYTES = 256 << 20  # a BPE trains on at most this much training-split text
ENCODE_BATCH = 64  # documents tokenised together (HF tokenizers runs a batch in parallel)


def cache_root(data: mlc.ConfigDict) -> Path:
    root = data.cache_dir or os.environ.get("HYBRIDLM_CACHE") or "~/.cache/hybridlm"
    return Path(root).expanduser()


@dataclasses.dataclass
class Prepared:
    """A prepared directory, opened: its manifest and per-document index."""

    directory: Path
    manifest: dict[str, Any]
    lengths: np.ndarray  # int64 [documents]: tokens per document, BOS counted, EOS not
    first_record: np.ndarray  # int64 [documents]
    name_hashes: np.ndarray  # int64 [documents]

    @property
    def shard_paths(self) -> list[str]:
        return [str(self.directory / name) for name in self.manifest["shards"]]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    def tokenizer(self) -> tok_lib.Tokenizer:
        return tok_lib.tokenizer_from_record(self.manifest["tokenizer"], self.directory)


def load_prepared(directory: str | Path) -> Prepared:
    directory = Path(directory).expanduser()
    path = directory / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"{directory} is not a prepared directory (no manifest.json); "
                          "make one with `hybridlm prepare`")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != PREPARE_VERSION:
        raise ConfigError(f"{directory} was prepared by format version "
                          f"{manifest.get('version')}, this hybridlm reads {PREPARE_VERSION}; "
                          "prepare it again")
    with np.load(directory / "index.npz") as index:
        return Prepared(directory, manifest, index["lengths"], index["first_record"],
                        index["name_hashes"])


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def length_histogram(lengths: np.ndarray) -> dict[str, list[int]]:
    """Documents per power-of-two length bin: counts[i] have edges[i] <= tokens < edges[i+1]."""
    top = max(int(lengths.max(initial=1)), 1)
    edges = [0] + [2**k for k in range(6, max(7, int(np.ceil(np.log2(top + 1))) + 1))]
    counts, _ = np.histogram(lengths, bins=edges + [edges[-1] * 2])
    return {"edges": edges, "counts": counts.tolist()}


def prepare_source(spec: sources_lib.SourceSpec, files: list[Path], tokenizer, out: Path, *,
                   text_field: str = "text", on_bad_record: str = "error",
                   fingerprint: str = "", progress: bool = True) -> Prepared:
    """Tokenise every document of `spec` into `out` (written atomically)."""
    start = time.perf_counter()
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _write_prepared(spec, files, tokenizer, tmp, text_field, on_bad_record,
                                   fingerprint, progress)
        manifest["seconds"] = round(time.perf_counter() - start, 2)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.rename(out)
    except OSError:  # another process finished the same preparation first: use theirs
        if not (out / "manifest.json").is_file():
            raise
    finally:  # whatever happened (a bad record, Ctrl-C, a full disk): no folder left behind
        shutil.rmtree(tmp, ignore_errors=True)
    return load_prepared(out)


def _write_prepared(spec: sources_lib.SourceSpec, files: list[Path], tokenizer, tmp: Path,
                    text_field: str, on_bad_record: str, fingerprint: str,
                    progress: bool) -> dict[str, Any]:
    """Tokenise into the folder `tmp`: shards, index, names, tokenizer; the manifest."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    record = tokenizer.describe()
    dtype = token_dtype(tokenizer.vocab_size)
    counts = sources_lib.Counts()
    lengths, first_record, hashes, names, shards = [], [], [], [], []
    writer, shard_bytes, n_records = None, SHARD_BYTES, 0
    bar = tqdm(total=len(files), unit="file", desc=f"prepare {spec.label}", disable=not progress,
               mininterval=0.5)
    docs = _documents(spec, files, counts, text_field, on_bad_record, bar)
    try:
        for batch in _batched(docs, ENCODE_BATCH):
            for (name, _), ids in zip(batch, tokenizer.encode_batch([t for _, t in batch]),
                                      strict=True):
                if shard_bytes >= SHARD_BYTES:
                    if writer is not None:
                        writer.close()
                    shards.append(f"tokens-{len(shards):05d}.array_record")
                    writer, shard_bytes = ArrayRecordWriter(str(tmp / shards[-1]),
                                                            "group_size:1"), 0
                data = np.concatenate([[record["bos_id"]], ids]).astype(dtype)
                lengths.append(len(data))
                first_record.append(n_records)
                hashes.append(split.name_hash(name))
                names.append(name)
                for i in range(0, max(len(data), 1), RECORD_TOKENS):
                    writer.write(data[i:i + RECORD_TOKENS].tobytes())
                    n_records += 1
                shard_bytes += data.nbytes
            bar.set_postfix(tokens=f"{sum(lengths):,}", refresh=False)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    if not lengths:
        raise ConfigError(f"data.source {spec.label!r}: no non-empty documents "
                          f"(skipped: {dict(counts)})")
    lengths_arr = np.asarray(lengths, np.int64)
    np.savez(tmp / "index.npz", lengths=lengths_arr,
             first_record=np.asarray(first_record, np.int64),
             name_hashes=np.asarray(hashes, np.int64))
    (tmp / "documents.txt").write_text("".join(n.replace("\n", " ") + "\n" for n in names))
    if record["type"] != "byte":
        suffix = ".model" if record["type"] == "sentencepiece" else ".json"
        shutil.copyfile(tokenizer.path, tmp / f"tokenizer{suffix}")
    manifest = {
        "version": PREPARE_VERSION, "source": spec.label, "fingerprint": fingerprint,
        "files": len(files), "tokenizer": record, "documents": len(lengths),
        "tokens": int(lengths_arr.sum()), "longest": int(lengths_arr.max()),
        "record_tokens": RECORD_TOKENS, "dtype": dtype.name, "shards": shards,
        "counts": dict(counts), "length_histogram": length_histogram(lengths_arr),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return manifest


def _documents(spec, files: list[Path], counts, text_field: str, on_bad_record: str,
               bar) -> Iterator[tuple[str, str]]:
    for path in files:
        yield from sources_lib.read_documents(spec, [path], counts, text_field, on_bad_record)
        bar.update(1)


def _batched(items: Iterator, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# ---- resolving data.source and data.tokenizer to prepared directories ---------------------

def resolve(data: mlc.ConfigDict, progress: bool = True,
            ) -> tuple[tok_lib.Tokenizer, list[tuple[Prepared, float]]]:
    """The tokenizer and the prepared form of every source in data.source, preparing raw
    sources into the cache on first use (and training a BPE first if data.tokenizer asks)."""
    root, specs, given, raw = _sources(data)
    tokenizer = _resolve_tokenizer(data, raw, list(given.values()), root, progress)
    fingerprint = tokenizer.describe()["fingerprint"]
    out = []
    for spec, weight in specs:
        if spec in given:
            prepared = given[spec]
            recorded = prepared.manifest["tokenizer"]
            if recorded["fingerprint"] != fingerprint:
                raise ConfigError(
                    f"data.source {spec.location!r} was prepared with tokenizer "
                    f"{recorded['spec']!r} ({recorded['type']}, vocab {recorded['vocab_size']}), "
                    f"but data.tokenizer is {data.tokenizer!r} (another tokenizer); set "
                    f"data.tokenizer to match or prepare the source again")
            if recorded["bos_id"] != tokenizer.bos_id:
                raise ConfigError(
                    f"data.source {spec.location!r} starts documents with token "
                    f"{recorded['bos_id']}, but data.tokenizer's BOS is {tokenizer.bos_id}; "
                    "set data.bos_token to match or prepare the source again")
        else:
            prepared = ensure_source(spec, raw[spec], tokenizer, data, root, progress)
        out.append((prepared, weight))
    return tokenizer, out


def resolve_tokenizer(data: mlc.ConfigDict, progress: bool = True) -> tok_lib.Tokenizer:
    """Only the tokenizer of `resolve` (training a BPE if needed; no source is prepared)."""
    root, _, given, raw = _sources(data)
    return _resolve_tokenizer(data, raw, list(given.values()), root, progress)


def _sources(data: mlc.ConfigDict):
    root = cache_root(data)
    specs = sources_lib.parse_sources(data.source, data.weights)
    given = {s: load_prepared(s.location) for s, _ in specs if s.kind == "prepared"}
    raw = {s: sources_lib.source_files(s, root) for s, _ in specs if s.kind != "prepared"}
    return root, specs, given, raw


def ensure_source(spec: sources_lib.SourceSpec, files: list[Path], tokenizer,
                  data: mlc.ConfigDict, root: Path, progress: bool = True) -> Prepared:
    """The cached preparation of a raw source, made now if it does not exist yet."""
    source_fp = sources_lib.fingerprint(spec, files)
    record = tokenizer.describe()
    key = _key(PREPARE_VERSION, source_fp, record["fingerprint"], record["bos_id"],
               data.text_field, data.on_bad_record)
    name = Path(spec.location.rstrip("/")).name if spec.location else ""
    slug = "".join(c if c.isalnum() or c in "-." else "_" for c in f"{spec.kind}-{name}")
    slug = slug.rstrip("-")[:48]
    out = root / "prepared" / f"{slug}-{record['type']}{record['vocab_size']}-{key}"
    if (out / "manifest.json").is_file():
        return load_prepared(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prepared = prepare_source(spec, files, tokenizer, out, text_field=data.text_field,
                              on_bad_record=data.on_bad_record, fingerprint=source_fp,
                              progress=progress)
    m = prepared.manifest
    print(f"prepared {spec.label}: {m['documents']:,} documents, {m['tokens']:,} tokens in "
          f"{m['seconds']} s -> {out}", flush=True)
    return prepared


def _resolve_tokenizer(data: mlc.ConfigDict, raw: dict, given: list[Prepared], root: Path,
                       progress: bool) -> tok_lib.Tokenizer:
    spec = data.tokenizer
    vocab = tok_lib.parse_bpe_spec(spec)
    if vocab is None:
        return tok_lib.get_tokenizer(spec, data.eos_token, data.bos_token)
    if not raw:  # only prepared sources: the BPE they were prepared with
        recorded = given[0].manifest["tokenizer"]
        if recorded["spec"] != spec:
            raise ConfigError(f"data.source {str(given[0].directory)!r} was prepared with "
                              f"tokenizer {recorded['spec']!r}, not data.tokenizer {spec!r}")
        return given[0].tokenizer()
    key = _key(PREPARE_VERSION, vocab, data.val_fraction, data.text_field, data.on_bad_record,
               sorted(sources_lib.fingerprint(s, f) for s, f in raw.items()))
    path = root / "tokenizers" / f"bpe{vocab}-{key}" / "tokenizer.json"
    if not path.is_file():
        start = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        try:
            tok_lib.train_bpe(_bpe_texts(data, raw, progress), vocab, tmp)
            tmp.rename(path)
        finally:
            tmp.unlink(missing_ok=True)
        print(f"trained a {vocab}-token byte-level BPE in {time.perf_counter() - start:.1f} s "
              f"-> {path}", flush=True)
    return tok_lib.HFTokenizer(path, spec)


def _bpe_texts(data: mlc.ConfigDict, raw: dict, progress: bool) -> Iterator[str]:
    """Training-split documents of the raw sources, up to BPE_TRAIN_BYTES of text."""
    from tqdm import tqdm

    total, counts = 0, sources_lib.Counts()
    files = sum(len(f) for f in raw.values())
    with tqdm(total=files, unit="file", desc="train BPE", disable=not progress,
              mininterval=0.5) as bar:
        for spec, spec_files in raw.items():
            for name, text in _documents(spec, spec_files, counts, data.text_field,
                                         data.on_bad_record, bar):
                if split.is_validation(split.name_hash(name), data.val_fraction):
                    continue
                yield text
                total += len(text)
                if total >= BPE_TRAIN_BYTES:
                    return


def prepare_to(data: mlc.ConfigDict, out: Path, progress: bool = True) -> Prepared:
    """`hybridlm prepare --out DIR`: one raw source into a directory of the user's choosing."""
    root = cache_root(data)
    specs = sources_lib.parse_sources(data.source, data.weights)
    if len(specs) != 1 or specs[0][0].kind == "prepared":
        raise ConfigError(f"--out takes exactly one raw source; data.source is {data.source!r}")
    spec = specs[0][0]
    files = sources_lib.source_files(spec, root)
    tokenizer = _resolve_tokenizer(data, {spec: files}, [], root, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    emptied = out.exists()
    if emptied:
        out.rmdir()  # empty (checked by the caller): the atomic rename needs it gone
    try:
        return prepare_source(spec, files, tokenizer, out, text_field=data.text_field,
                              on_bad_record=data.on_bad_record,
                              fingerprint=sources_lib.fingerprint(spec, files),
                              progress=progress)
    except BaseException:
        if emptied:
            out.mkdir(exist_ok=True)  # leave the user's empty directory as it was
        raise


def summary(prepared: Prepared) -> str:
    """What the manifest says, for people: counts, skips and the length histogram."""
    m = prepared.manifest
    tok = m["tokenizer"]
    lines = [f"{m['source']} -> {prepared.directory}",
             f"  tokenizer {tok['spec']} ({tok['type']}, vocab {tok['vocab_size']}); "
             f"{m['files']:,} files, {m['documents']:,} documents, {m['tokens']:,} tokens, "
             f"longest {m['longest']:,}",
             "  skipped or repaired: " + (", ".join(f"{k} {v}" for k, v in sorted(
                 m["counts"].items()) if k != "documents") or "nothing"),
             "  document length (tokens)   documents"]
    hist = m["length_histogram"]
    edges = hist["edges"] + [hist["edges"][-1] * 2]
    for lo, hi, n in zip(edges[:-1], edges[1:], hist["counts"], strict=True):
        if n:
            lines.append(f"  [{lo:>9,}, {hi:>9,})   {n:>9,}")
    return "\n".join(lines)
