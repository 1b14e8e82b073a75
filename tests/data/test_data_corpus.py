"""The embedded corpus, its deliberate held-out split, and corpus I/O."""
from __future__ import annotations

import pytest

from megafire.data.cleaning import normalize_layout, strip_gutenberg
from megafire.data.corpus import (DEFAULT_CORPUS, Document, load_corpus, load_corpus_meta, split_documents,
                                  write_corpus)
from megafire.data.tokenizer import Tokenizer


def test_default_corpus_is_embedded_and_small():
    assert DEFAULT_CORPUS.is_file() and DEFAULT_CORPUS.stat().st_size < 8 * 2**20
    docs = load_corpus("default")
    assert len(docs) == load_corpus_meta()["num_docs"] >= 50
    assert len({d.id for d in docs}) == len(docs)
    assert all(d.text and d.title for d in docs)
    assert not any("Project Gutenberg" in d.text for d in docs)


def test_eval_split_is_long_and_leak_free(tokenizer_path):
    meta = load_corpus_meta()
    train, held_out = load_corpus("default", "train"), load_corpus("default", "eval")
    assert [d.id for d in held_out] and {d.id for d in held_out} == set(meta["eval_ids"])
    assert not {d.id for d in train} & {d.id for d in held_out}
    # Both editions of a held-out play are held out: no near-copy of eval text is trained on.
    plays = {d.id.split("/")[1] for d in held_out}
    assert not any(d.id.split("/")[1] in plays for d in train)
    tok = Tokenizer(tokenizer_path)
    lengths = [len(tok.encode(d.text)) for d in held_out]
    assert min(lengths) >= 16 * 128 and sum(n >= 8192 for n in lengths) >= 4


def test_unknown_eval_id_is_an_error():
    docs = [Document("a", "A", "x")]
    with pytest.raises(ValueError, match="not in corpus"):
        split_documents(docs, ["b"])


def test_write_and_load_roundtrip(tmp_path):
    docs = [Document("a", "A", "line\n\ttab ünï\n", {"author": "x"}), Document("b", "B", "two")]
    meta = write_corpus(docs, tmp_path / "c.jsonl.gz", eval_ids=["b"], meta={"name": "t"})
    assert meta["num_docs"] == 2 and load_corpus_meta(tmp_path / "c.jsonl.gz")["eval_ids"] == ["b"]
    assert load_corpus(tmp_path) == docs   # a directory with one corpus resolves to it
    assert [d.id for d in load_corpus(tmp_path / "c.jsonl.gz", "train")] == ["a"]
    assert load_corpus(tmp_path / "c.jsonl.gz")[0].extra == {"author": "x"}


def test_strip_gutenberg_markers():
    text = ("The Project Gutenberg EBook of X\nlicence\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
            "Body line\r\nmore  \n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore licence\n")
    assert normalize_layout(strip_gutenberg(text)) == "Body line\nmore\n"
    old = "small print\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nBody\nEnd of Project Gutenberg's X\n"
    assert normalize_layout(strip_gutenberg(old)) == "Body\n"
    assert strip_gutenberg("plain text\n") == "plain text\n"


def test_debian_builder_on_local_source(tmp_path):
    """The serious-run builder, on the one source every machine has (no apt installs)."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[2] / "data_prep" / "build_debian_corpora.py"
    subprocess.run([sys.executable, str(script), str(tmp_path), "--sources", "python_code", "--max-docs", "40",
                    "--eval-min-chars", "20000"], check=True, capture_output=True)
    docs = load_corpus(tmp_path)
    held_out = load_corpus(tmp_path, "eval")
    assert len(docs) == 40 and all(d.id.startswith("python_code/") for d in docs)
    assert held_out and all(len(d.text) >= 20000 for d in held_out)
