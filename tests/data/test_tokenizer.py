"""Tokenizers for prepare: the trained layout, loading, and tiktoken agreeing with `tokenizers`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtools.data.tokenizer import (
    EOT,
    Encoder,
    bytes_to_unicode,
    bytes_tokenizer,
    load_tokenizer,
    to_tiktoken,
    train_bpe,
)
from lmtools.errors import ConfigError, DataError

PROSE = (
    "The quick brown fox jumps over the lazy dog. It's a sentence we'll use, isn't it?\n"
    "Numbers 12345 and 3.14159; symbols #@!$%^&*() and   runs of   spaces.\n\n"
    "Ünïcödé téxt: naïve café, Straße, Ελληνικά, русский, 中文字符, 日本語, 한국어, "
    "emoji 😀🎉 and combining e\u0301.\n\tTabs\tand\r\nCRLF line ends.\n"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small BPE (vocab 400) trained once, saved as tokenizer.json."""
    tok = train_bpe(iter([[PROSE * 3, "def f(x):\n    return x + 1\n" * 5]]), 400)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_trained_bpe_layout_and_tiktoken_agreement(trained):
    tok, kind = load_tokenizer(trained)
    enc = Encoder(tok, kind, threads=2)
    assert enc.engine == "tiktoken"
    assert enc.vocab_size == 400 and enc.eot_id == 399
    b2u = bytes_to_unicode()
    assert all(tok.token_to_id(b2u[b]) == b for b in range(256))
    texts = [
        PROSE,
        "",
        EOT,
        f"a{EOT}b",
        "   \n\n\t x",
        "it's they'll we've I'm",
        "x" * 5000,
        "\u00a0\u2009\u3000 spaces\u2028\u2029",
        "ǅ ǈ ˆ ʰ ߺ ꙿ 𝔘𝔫𝔦",
        "١٢٣ ½ ² Ⅻ",
    ]
    fast = enc.encode_batch(texts)
    ref = enc.encode_reference(texts)
    for t, a, b in zip(texts, fast, ref):
        assert np.array_equal(a, b), t
        assert tok.decode(a.tolist()) == t
    assert enc.eot_id not in fast[2]  # "<|endoftext|>" in text is ordinary text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=60), max_size=8))
def test_tiktoken_equals_tokenizers_on_random_text(trained, texts):
    enc = _ENCODERS.setdefault(trained, Encoder(load_tokenizer(trained)[0], "bpe", threads=2))
    for t, a, b in zip(texts, enc.encode_batch(texts), enc.encode_reference(texts)):
        assert np.array_equal(a, b), t


_ENCODERS: dict = {}


def test_bytes_tokenizer_decodes_bytes():
    tok = bytes_tokenizer()
    enc = Encoder(tok, "bytes")
    assert enc.engine == "bytes" and enc.vocab_size == 257 and enc.eot_id == 256
    ids = enc.encode_batch([PROSE])[0]
    assert ids.tolist() == list(PROSE.encode()) and tok.decode(ids.tolist()) == PROSE


def test_vocab_size_below_the_byte_alphabet_is_a_config_error():
    with pytest.raises(ConfigError, match="at least 257"):
        train_bpe(iter([["x"]]), 256)


def test_small_corpus_gives_a_smaller_vocabulary():
    tok = train_bpe(iter([["ab ab ab"]]), 1000)
    assert 257 < tok.get_vocab_size() < 1000
    assert tok.token_to_id(EOT) == tok.get_vocab_size() - 1


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither tokenizer.json nor vocab.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a tokenizers JSON"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "vocab.json").write_text(json.dumps({"a": 0, "b": 0}))
    (tmp_path / "g" / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(DataError, match="unique id"):
        load_tokenizer(tmp_path / "g")
    (tmp_path / "g" / "merges.txt").unlink()
    (tmp_path / "g" / "vocab.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(DataError, match="merges.txt"):
        load_tokenizer(tmp_path / "g")
    (tmp_path / "g" / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(DataError, match="byte-level"):
        load_tokenizer(tmp_path / "g" / "vocab.json")
    (tmp_path / "g" / "merges.txt").write_text("#version: 0.2\nx y\n")
    with pytest.raises(DataError, match=":2: not a merge"):
        load_tokenizer(tmp_path / "g" / "vocab.json")


def test_loaded_tokenizer_gets_the_end_of_text_token(tmp_path, trained):
    spec = json.loads(trained.read_text())
    spec["added_tokens"] = []
    del spec["model"]["vocab"][EOT]
    (tmp_path / "t.json").write_text(json.dumps(spec))
    tok, kind = load_tokenizer(tmp_path / "t.json")
    assert kind == "tokenizer.json" and tok.token_to_id(EOT) == 399
    assert Encoder(tok, kind).engine == "tiktoken"


def test_only_plain_byte_level_bpe_converts_to_tiktoken(trained):
    from tokenizers import AddedToken, normalizers, pre_tokenizers

    def variant(change):
        tok, _ = load_tokenizer(trained)
        change(tok)
        return to_tiktoken(tok)

    assert variant(lambda t: None) is not None
    assert variant(lambda t: setattr(t, "normalizer", normalizers.NFKC())) is None
    assert variant(lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True))) is None
    assert variant(lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Whitespace())) is None
    assert variant(lambda t: t.add_tokens([AddedToken("hello world", special=False)])) is None
