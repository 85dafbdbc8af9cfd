"""Document sources: what `data.source` names, read as (name, text) documents.

A source spec is one of
  stdlib | shakespeare             the built-in corpora (hybridlm/data/corpus.py)
  [text:]PATH                      a text file, a directory (every file under it) or a glob;
                                   one file is one document
  [jsonl:]PATH                     JSON lines (*.jsonl); data.text_field holds the text
  [parquet:]PATH                   Parquet files (*.parquet); data.text_field is the column
  [prepared:]DIR                   the output of `hybridlm prepare` (holds manifest.json)
  retrieval:COUNT[:CHARS[:TASKS]]  synthetic retrieval documents (hybridlm/data/synthetic.py)
Without a prefix the kind follows from the path. Several sources are separated by commas
and mixed with data.weights.

Bad input never ends in a traceback: a missing path or an empty directory is a ConfigError
naming it; text that is not UTF-8 is decoded with replacement and counted; empty documents
are skipped and counted; a JSONL line that is not JSON or lacks the field is an error with
file:line, or is skipped and counted with data.on_bad_record="skip".
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from hybridlm.data import corpus, synthetic
from hybridlm.errors import ConfigError

BUILTIN = ("stdlib", "shakespeare")
KINDS = ("text", "jsonl", "parquet", "prepared", "retrieval")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    kind: str  # "stdlib" | "shakespeare" | "text" | "jsonl" | "parquet" | "prepared"
    location: str  # the path or glob ("" for the built-in corpora)

    @property
    def label(self) -> str:
        return self.kind if self.kind in BUILTIN else f"{self.kind}:{self.location}"


def parse_sources(source: str, weights: str = "") -> list[tuple[SourceSpec, float]]:
    """'stdlib,jsonl:/d/*.jsonl' + '3,1' -> [(spec, weight), ...]."""
    items = [s.strip() for s in source.split(",") if s.strip()]
    if not items:
        raise ConfigError("data.source is empty; use 'stdlib' or a path (see docs/data.md)")
    specs = [_parse_one(s) for s in items]
    if weights.strip():
        try:
            values = [float(w) for w in weights.split(",")]
        except ValueError:
            raise ConfigError(f"data.weights {weights!r}: give comma-separated numbers, one per "
                              "source") from None
        if len(values) != len(specs) or any(w <= 0 for w in values):
            raise ConfigError(f"data.weights {weights!r}: need {len(specs)} positive numbers, "
                              f"one per source in data.source ({source!r})")
    else:
        values = [1.0] * len(specs)
    return list(zip(specs, values, strict=True))


def _parse_one(item: str) -> SourceSpec:
    if item in BUILTIN:
        return SourceSpec(item, "")
    kind, sep, rest = item.partition(":")
    if sep and kind in KINDS:
        if kind == "retrieval":
            synthetic.parse_spec(rest)  # a malformed spec fails here, before anything runs
        return SourceSpec(kind, rest)
    path = Path(item).expanduser()
    if path.is_dir() and (path / "manifest.json").is_file():
        return SourceSpec("prepared", item)
    first = _matches(item)[:1]
    suffix = Path(first[0] if first else item).suffix
    return SourceSpec({".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix, "text"), item)


def _matches(location: str) -> list[str]:
    expanded = str(Path(location).expanduser())
    if glob.has_magic(expanded):
        return sorted(glob.glob(expanded, recursive=True))
    return [expanded] if Path(expanded).exists() else []


def source_files(spec: SourceSpec, cache_root: Path) -> list[Path]:
    """The files a source reads, in a fixed order; a ConfigError if there are none."""
    if spec.kind == "stdlib":
        files = corpus.stdlib_files()
        if not files:
            raise ConfigError(f"data.source 'stdlib': no .py files under {corpus.stdlib_dir()}")
        return files
    if spec.kind == "shakespeare":
        return corpus.shakespeare_files(cache_root)
    if spec.kind == "retrieval":  # generated; the stdlib (its haystack) stands for its files
        return [corpus.stdlib_dir()]
    matches = _matches(spec.location)
    if not matches:
        raise ConfigError(f"data.source {spec.label!r}: no such file or directory, and no glob "
                          "match; check the path")
    suffix = {"jsonl": ".jsonl", "parquet": ".parquet"}.get(spec.kind)
    files: list[Path] = []
    for match in map(Path, matches):
        if match.is_dir():
            files += sorted(p for p in match.rglob("*") if p.is_file() and
                            not any(part.startswith(".") for part in p.relative_to(match).parts)
                            and (suffix is None or p.suffix == suffix))
        elif match.is_file():
            files.append(match)
    if not files:
        what = f"{suffix} files" if suffix else "files"
        raise ConfigError(f"data.source {spec.label!r}: found no {what} there (empty directory?)")
    return files


def fingerprint(spec: SourceSpec, files: list[Path]) -> str:
    """Changes when a file is added, removed or modified (or, for stdlib, Python changes)."""
    version = sys.version if spec.kind in ("stdlib", "retrieval") else ""
    if spec.kind == "retrieval":  # generated: the generator's format is part of its content
        version += f" retrieval format {synthetic.FORMAT}"
    h = hashlib.sha256(f"{spec.kind}\n{spec.location}\n{version}\n".encode())
    for path in files:
        st = path.stat()
        h.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def is_synthetic(label: str) -> bool:
    """Whether a source label (a prepared manifest's "source") names generated retrieval
    documents: evaluation keeps them out of haystacks and held-out loss."""
    return label.startswith("retrieval:")


class Counts(collections.Counter):
    """What reading a source skipped or repaired: documents, empty, non_utf8, bad_json, ..."""


def read_documents(spec: SourceSpec, files: list[Path], counts: Counts, text_field: str = "text",
                   on_bad_record: str = "error") -> Iterator[tuple[str, str]]:
    """Yield (name, text) for every non-empty document; the name decides the split."""
    if spec.kind == "retrieval":
        for name, text in synthetic.retrieval_documents(*synthetic.parse_spec(spec.location)):
            yield from _keep(name, text, counts)
        return
    base = _base(spec)
    for path in files:
        name = f"{spec.kind}/{path.name}" if spec.kind == "shakespeare" else \
            path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)
        if spec.kind == "jsonl":
            yield from _jsonl(path, name, counts, text_field, on_bad_record)
        elif spec.kind == "parquet":
            yield from _parquet(path, name, counts, text_field)
        else:
            yield from _keep(name, _decode(path.read_bytes(), counts), counts)


def _base(spec: SourceSpec) -> Path:
    """Document names are relative to this folder, so that moving a corpus keeps its split."""
    if spec.kind == "stdlib":
        return corpus.stdlib_dir().parent  # names like python3.11/json/decoder.py
    path = Path(spec.location).expanduser()
    if glob.has_magic(str(path)):
        parts = path.parts
        fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        return Path(*parts[:fixed]) if fixed else Path(".")
    return path if path.is_dir() else path.parent


def _decode(data: bytes, counts: Counts) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        counts["non_utf8"] += 1
        return data.decode("utf-8", errors="replace")


def _keep(name: str, text: str, counts: Counts) -> Iterator[tuple[str, str]]:
    if text.strip():
        counts["documents"] += 1
        yield name, text
    else:
        counts["empty"] += 1


def _bad(where: str, message: str, kind: str, counts: Counts, on_bad_record: str) -> None:
    if on_bad_record != "skip":
        raise ConfigError(f"{where}: {message}; fix it, or set data.on_bad_record=skip to skip "
                          "and count such records")
    counts[kind] += 1


def _jsonl(path: Path, name: str, counts: Counts, field: str,
           on_bad: str) -> Iterator[tuple[str, str]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, counts).strip()
            where = f"{path}:{lineno}"  # errors name the full path, documents name:line
            if not line:
                counts["empty"] += 1
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                _bad(where, f"not valid JSON ({e.msg})", "bad_json", counts, on_bad)
                continue
            if not isinstance(record, dict) or field not in record:
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                _bad(where, f"no field {field!r} (has {fields}); set data.text_field",
                     "missing_field", counts, on_bad)
                continue
            if not isinstance(record[field], str):
                _bad(where, f"field {field!r} is a {type(record[field]).__name__}, not text",
                     "missing_field", counts, on_bad)
                continue
            yield from _keep(f"{name}:{lineno}", record[field], counts)


def _parquet(path: Path, name: str, counts: Counts, field: str) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"data.source {path}: reading Parquet needs pyarrow: "
                          "pip install pyarrow (or pip install 'hybridlm[data]')") from None
    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise ConfigError(f"{path}: not a readable Parquet file ({e})") from None
    columns = file.schema_arrow.names
    if field not in columns:
        raise ConfigError(f"{path}: no column {field!r} (columns: {columns}); set "
                          "data.text_field")
    row = 0
    for batch in file.iter_batches(columns=[field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is None or not isinstance(text, str):
                counts["empty"] += 1
            else:
                yield from _keep(f"{name}#{row}", text, counts)
            row += 1
