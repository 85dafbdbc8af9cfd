"""Tokenizers: byte, a BPE trained by prepare, user files; recorded with the data; vocab checks."""

import hashlib
import sys

import numpy as np
import pytest

from hybridlm.config import ConfigError
from hybridlm.data import prepare
from hybridlm.data.packing import PieceSource, piece_table
from hybridlm.data.pipeline import check_vocab, load_tokenizer, make_train_iterator
from hybridlm.data.tokenizers import ByteTokenizer, HFTokenizer, get_tokenizer
from tests.test_data_sources import CORPUS_FILES, data_config, make_corpus


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, corpus_dir):
    """A 400-token BPE trained on the corpus, and the data prepared with it."""
    cache = tmp_path_factory.mktemp("cache")
    cfg = data_config(cache, corpus_dir, "data.tokenizer=bpe:400", "data.seq_len=64")
    tokenizer, [(prepared, _)] = prepare.resolve(cfg.data, progress=False)
    return cfg, tokenizer, prepared


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "naïve café — λx. x ∘ x\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.tolist() == list(text.encode())
    assert tok.decode(ids.tolist() + [tok.EOS, tok.PAD]) == text


def test_bpe_trained_by_prepare_round_trips_and_is_recorded(bpe, corpus_dir):
    cfg, tokenizer, prepared = bpe
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.vocab_size <= 400 and tokenizer.eos_id == 0
    record = prepared.manifest["tokenizer"]
    assert record["spec"] == "bpe:400" and record["type"] == "hf"
    stored = prepared.directory / "tokenizer.json"
    assert record["fingerprint"] == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert stored.read_bytes() == tokenizer.path.read_bytes()
    names = (prepared.directory / "documents.txt").read_text().split()
    whole = PieceSource(prepared, piece_table(prepared.lengths, 10**9))
    for doc, name in enumerate(names):
        ids = whole[doc]["inputs"]
        assert tokenizer.decode(ids) == (corpus_dir / name).read_text()
    byte_tokens = sum(len((corpus_dir / n).read_bytes()) for n in CORPUS_FILES)
    assert prepared.manifest["tokens"] < 0.6 * byte_tokens, "merges compress the text"
    assert load_tokenizer(cfg).describe() == tokenizer.describe()
    batch = next(make_train_iterator(cfg, progress=False))
    assert batch["inputs"].max() < tokenizer.vocab_size


def test_prepared_data_carries_its_tokenizer_and_a_mismatch_is_an_error(bpe, tmp_path):
    cfg, tokenizer, prepared = bpe
    as_source = data_config(tmp_path, prepared.directory, "data.tokenizer=bpe:400")
    assert load_tokenizer(as_source).describe() == tokenizer.describe()
    wrong = data_config(tmp_path, prepared.directory)  # data.tokenizer=byte
    with pytest.raises(ConfigError, match="was prepared with tokenizer 'bpe:400'.*'byte'"):
        prepare.resolve(wrong.data, progress=False)


def test_vocab_checks_name_the_sizes(bpe, tmp_path):
    _, tokenizer, _ = bpe
    with pytest.raises(ConfigError, match=r"model.vocab_size \(300\) is smaller .*'bpe:400'"):
        data_config(tmp_path, "stdlib", "data.tokenizer=bpe:400", "model.vocab_size=300")
    path = str(tokenizer.path)
    small = data_config(tmp_path, "stdlib", f"data.tokenizer={path}", "model.vocab_size=300")
    size = tokenizer.vocab_size
    with pytest.raises(ConfigError, match=rf"model.vocab_size \(300\) .*\({size}\)"):
        check_vocab(small)
    small.model.vocab_size = 512
    assert check_vocab(small) == tokenizer.vocab_size
    assert check_vocab(data_config(tmp_path, "stdlib")) == 260


def test_user_tokenizer_json_needs_an_end_of_document_token(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2, "<sep>": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match="none of the usual end-of-document tokens.*eos_token"):
        get_tokenizer(str(tmp_path / "tokenizer.json"))
    loaded = get_tokenizer(str(tmp_path / "tokenizer.json"), eos_token="<sep>")
    assert loaded.eos_id == 3 and loaded.encode("a b c").tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="data.eos_token '<eos>' is not in the vocabulary"):
        get_tokenizer(str(tmp_path / "tokenizer.json"), eos_token="<eos>")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not a readable tokenizer.json"):
        get_tokenizer(str(tmp_path / "broken.json"))


def test_sentencepiece_model_the_user_brings(tmp_path, corpus_dir, monkeypatch):
    import sentencepiece as spm  # the test extra installs it; hybridlm imports it on demand
    lines = [line.strip() for name in CORPUS_FILES
             for line in (corpus_dir / name).read_text().splitlines() if line.strip()]
    (tmp_path / "train.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"),
                                   model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                   model_type="bpe", minloglevel=2)
    path = str(tmp_path / "sp.model")
    cfg = data_config(tmp_path / "cache", corpus_dir, f"data.tokenizer={path}")
    tokenizer, [(prepared, _)] = prepare.resolve(cfg.data, progress=False)
    assert tokenizer.vocab_size == 300 and tokenizer.eos_id == 2  # SentencePiece's </s>
    assert prepared.manifest["tokenizer"]["type"] == "sentencepiece"
    assert (prepared.directory / "tokenizer.model").read_bytes() == (tmp_path / "sp.model") \
        .read_bytes()
    sentence = "def decode(self, s):"
    assert tokenizer.decode(tokenizer.encode(sentence)) == sentence
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ConfigError, match="pip install sentencepiece"):
        get_tokenizer(path)
