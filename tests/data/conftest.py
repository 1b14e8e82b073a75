"""Shared fixtures: a small real tokenizer and synthetic shards whose token ids are all distinct."""
from __future__ import annotations

import numpy as np
import pytest

from megafire.data.corpus import Document, load_corpus
from megafire.data.shards import write_shards
from megafire.data.tokenizer import train_tokenizer

EOS = 2


@pytest.fixture(scope="session")
def small_docs() -> list[Document]:
    """Six real documents, cut to 12k characters each: enough text for a 600-piece BPE."""
    docs = load_corpus("default", "train")[:6]
    return [Document(d.id, d.title, d.text[:12_000]) for d in docs]


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory, small_docs):
    return train_tokenizer(small_docs, tmp_path_factory.mktemp("tok"), vocab_size=600, model_type="bpe")


def unique_token_docs(lengths, first_token: int = 10):
    """Documents whose tokens are consecutive integers never repeated anywhere (and never EOS)."""
    docs, nxt = [], first_token
    for i, n in enumerate(lengths):
        docs.append((f"doc{i}", f"Doc {i}", np.arange(nxt, nxt + n, dtype=np.int64)))
        nxt += n
    return docs


@pytest.fixture
def make_shards(tmp_path):
    def make(lengths, num_shards=3, name="shards"):
        docs = unique_token_docs(lengths)
        write_shards(docs, tmp_path / name, num_shards=num_shards, vocab_size=1_000_000, eos_id=EOS,
                     progress=False)
        return tmp_path / name, docs
    return make
