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


# --- bad input: every error names file:line --------------------------------------------
@pytest.mark.parametrize("content,line,msg", [
    (b'{"text": "a"}\n{"text": "b",}\n', 2, "invalid JSON: Expecting property name"),
    (b'{"text": "a"}\n\n{"text": "b\xff"}\n', 3, "invalid UTF-8 at byte 26 of the file (column 12)"),
    (b'{"text": "a"}\n[1, 2]\n', 2, 'a record must be a JSON object with a "text" string, got list'),
    (b'{"id": "x", "body": "a"}\n', 1, "record lacks \"text\" (it has 'id', 'body')"),
    (b'{"text": 3}\n', 1, '"text" must be a string, got int'),
])
def test_malformed_lines_name_file_and_line(tmp_path, content, line, msg):
    from megafire.config import ConfigError
    from megafire.data.corpus import CorpusError
    path = tmp_path / "c.jsonl"
    path.write_bytes(content)
    with pytest.raises(CorpusError) as info:
        load_corpus(path)
    assert str(info.value).startswith(f"{path}:{line}: ") and msg in str(info.value)
    assert isinstance(info.value, ConfigError)   # megafire.cli prints it as one `error:` line


def test_truncated_or_fake_gzip_names_the_file(tmp_path):
    import gzip
    import json

    from megafire.data.corpus import CorpusError
    data = gzip.compress(b"".join(json.dumps({"text": f"{i} " * 500}).encode() + b"\n" for i in range(100)))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match=r"cut\.jsonl\.gz:\d+: cannot read the file: Compressed file ended"):
        load_corpus(tmp_path / "cut.jsonl.gz")
    (tmp_path / "fake.jsonl.gz").write_bytes(b'{"text": "not gzip"}\n')
    with pytest.raises(CorpusError, match=r"fake\.jsonl\.gz:1: cannot read the file: Not a gzipped file"):
        load_corpus(tmp_path / "fake.jsonl.gz")


def test_missing_corpus_and_bad_meta(tmp_path):
    from megafire.config import MissingFileError
    from megafire.data.corpus import CorpusError
    with pytest.raises(MissingFileError, match="corpus .*nope.jsonl does not exist"):
        load_corpus(tmp_path / "nope.jsonl")
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / "c.meta.json").write_text('{"eval_ids": ["line-1",]}')
    with pytest.raises(CorpusError, match=r"c\.meta\.json:1: invalid JSON"):
        load_corpus(tmp_path / "c.jsonl", "train")
    (tmp_path / "c.meta.json").write_text('{"eval_ids": ["zzz"]}')
    with pytest.raises(CorpusError, match=r"c\.meta\.json: eval ids not in corpus: \['zzz'\]"):
        load_corpus(tmp_path / "c.jsonl", "eval")


# --- a plain JSONL (no meta.json): a deterministic held-out split by length ----------------
def _plain_corpus(path, n=40):
    import json
    lengths = [200 + (i * 7919) % 3000 for i in range(n)]     # distinct, in no particular order
    path.write_text("".join(json.dumps({"text": "x" * k}) + "\n" for k in lengths))
    return lengths


def test_plain_jsonl_default_split(tmp_path, capsys):
    from megafire.data.corpus import EVAL_FRACTION
    lengths = _plain_corpus(tmp_path / "plain.jsonl")
    docs = load_corpus(tmp_path / "plain.jsonl")
    assert [d.id for d in docs][:2] == ["line-1", "line-2"] and docs[0].title == "line-1"
    train, held_out = load_corpus(tmp_path / "plain.jsonl", "train"), load_corpus(tmp_path / "plain.jsonl", "eval")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no eval_ids in plain.meta.json; holding out" in err and "eval_ids" in err
    train_ids, eval_ids = [d.id for d in train], [d.id for d in held_out]
    assert not set(train_ids) & set(eval_ids) and sorted(train_ids + eval_ids) == sorted(d.id for d in docs)
    assert train_ids == [d.id for d in docs if d.id not in eval_ids]          # file order kept
    # the longest document is held out, the second longest is trained on; ~EVAL_FRACTION of the text
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    assert f"line-{order[0] + 1}" in eval_ids and f"line-{order[1] + 1}" in train_ids
    held_chars = sum(len(d.text) for d in held_out)
    assert EVAL_FRACTION * sum(lengths) <= held_chars < EVAL_FRACTION * sum(lengths) + max(lengths)
    # stable: the same split again (and in another process: nothing depends on hashing or time)
    assert [d.id for d in load_corpus(tmp_path / "plain.jsonl", "eval")] == eval_ids
    assert [d.id for d in load_corpus(tmp_path / "plain.jsonl", "train")] == train_ids
    assert capsys.readouterr().err == ""                                    # said once per process


def test_meta_eval_ids_win_over_the_default_split(tmp_path):
    _plain_corpus(tmp_path / "plain.jsonl")
    (tmp_path / "plain.meta.json").write_text('{"eval_ids": ["line-3", "line-5"]}')
    assert [d.id for d in load_corpus(tmp_path / "plain.jsonl", "eval")] == ["line-3", "line-5"]
    assert len(load_corpus(tmp_path / "plain.jsonl", "train")) == 38


def test_one_document_cannot_be_split(tmp_path):
    from megafire.data.corpus import CorpusError
    (tmp_path / "one.jsonl").write_text('{"text": "only"}\n')
    with pytest.raises(CorpusError, match="cannot hold out documents from a corpus of 1 document"):
        load_corpus(tmp_path / "one.jsonl", "train")
    assert len(load_corpus(tmp_path / "one.jsonl", "all")) == 1


def test_prep_shards_on_plain_jsonl_with_defaults(tmp_path, tokenizer_path, small_docs):
    import json

    from megafire.data.prep import prep_shards
    with open(tmp_path / "plain.jsonl", "w") as f:
        for d in small_docs:
            f.write(json.dumps({"text": d.text}) + "\n")
    train = prep_shards(tmp_path / "plain.jsonl", tokenizer_path, tmp_path / "train", progress=False)
    held_out = prep_shards(tmp_path / "plain.jsonl", tokenizer_path, tmp_path / "eval", split="eval",
                           progress=False)
    assert train["num_docs"] + held_out["num_docs"] == len(small_docs) and held_out["num_docs"] >= 1
