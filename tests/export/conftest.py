"""Export tests run offline with a private HF_HOME (remote code is cached there).

The environment is set when this file is imported, before the tests import transformers;
if another test directory imported it first, its module cache is redirected too.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

from export_testlib import offline_env

_HF_HOME = Path(tempfile.mkdtemp(prefix="megafire-hf-home-"))
offline_env(_HF_HOME)
if "transformers.dynamic_module_utils" in sys.modules:       # imported earlier in this session
    sys.modules["transformers.dynamic_module_utils"].HF_MODULES_CACHE = str(_HF_HOME / "modules")


@pytest.fixture(scope="session")
def hf_home() -> Path:
    return _HF_HOME


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 384-piece lossless BPE SentencePiece model trained on a slice of the default corpus."""
    from megafire.data.corpus import Document, load_corpus
    from megafire.data.tokenizer import train_tokenizer
    from export_testlib import VOCAB
    docs = [Document(d.id, d.title, d.text[:20_000]) for d in load_corpus("default", "train")[:6]]
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(docs, out, vocab_size=VOCAB, model_type="bpe")
    return out


@pytest.fixture(scope="session")
def held_out_text() -> str:
    from megafire.data.corpus import load_corpus
    docs = load_corpus("default", "train")
    return "".join(d.text[30_000:45_000] for d in docs[6:9])
