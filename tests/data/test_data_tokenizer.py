"""Tokenizer: lossless round trip, ids, checksum, vocabulary check, idempotent training."""
from __future__ import annotations

import hashlib

import pytest

from megafire.data.tokenizer import Tokenizer, check_vocab, train_tokenizer

TRICKY = "Tab\tand  two spaces\n\n\nline\r\nend ünïcødé 漢字 😀 ſ ﬁ Ⅻ\u00a0nbsp  \n\t\n"


def test_roundtrip_is_exact(tokenizer_path, small_docs):
    tok = Tokenizer(tokenizer_path)
    for text in [TRICKY, " leading space", "trailing space ", "", small_docs[0].text]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.unk_id not in tok.encode(TRICKY)   # byte fallback, not <unk>


def test_special_ids_and_checksum(tokenizer_path):
    tok = Tokenizer(tokenizer_path.parent)  # a directory resolves to tokenizer.model
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 600
    assert tok.checksum == hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()


def test_check_vocab_names_both_sizes_and_file(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    check_vocab(tok, 600)
    with pytest.raises(ValueError) as err:
        check_vocab(tok, 4096)
    assert "4096" in str(err.value) and "600" in str(err.value) and str(tokenizer_path) in str(err.value)
    check_vocab(tok, 640, allow_padding=True)
    with pytest.raises(ValueError):
        check_vocab(tok, 512, allow_padding=True)


def test_training_is_idempotent(tokenizer_path, small_docs):
    before = tokenizer_path.stat().st_mtime_ns
    again = train_tokenizer(small_docs, tokenizer_path.parent, vocab_size=600, model_type="bpe")
    assert again == tokenizer_path and again.stat().st_mtime_ns == before


def test_bad_arguments(tmp_path, small_docs):
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(small_docs, tmp_path, 600, "wordpiece")
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(small_docs, tmp_path, 100)
