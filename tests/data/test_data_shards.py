"""Shards: manifest counts, exact tokens, verification errors, idempotence, parallel = serial."""
from __future__ import annotations

import json

import numpy as np
import pytest
import webdataset as wds

from megafire.data.shards import MANIFEST, ShardError, ShardSet, write_shards
from megafire.data.tokenizer import Tokenizer


@pytest.fixture
def shard_dir(tmp_path, small_docs, tokenizer_path):
    write_shards(small_docs, tmp_path / "s", tokenizer_path=tokenizer_path, num_shards=3, progress=False)
    return tmp_path / "s"


def test_manifest_counts_equal_corpus(shard_dir, small_docs, tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    expected = [len(tok.encode(d.text)) for d in small_docs]
    assert manifest["num_docs"] == len(small_docs) == sum(s["num_docs"] for s in manifest["shards"])
    assert manifest["num_tokens"] == sum(expected) == sum(s["num_tokens"] for s in manifest["shards"])
    assert manifest["tokenizer"]["checksum"] == tok.checksum and manifest["dtype"] == "uint16"
    shards = ShardSet(shard_dir)
    assert shards.doc_ids == [d.id for d in small_docs]
    for i, d in enumerate(small_docs):
        assert tok.decode(shards.doc(i)) == d.text


def test_shards_are_webdataset_readable(shard_dir, small_docs):
    samples = list(wds.WebDataset(str(shard_dir / "shard-00000.tar"), shardshuffle=False).decode())
    assert samples and samples[0]["json"]["id"] == small_docs[0].id
    np.testing.assert_array_equal(samples[0]["tokens.npy"], ShardSet(shard_dir).doc(0))


def test_corrupt_shard_error_names_file(shard_dir):
    path = shard_dir / "shard-00001.tar"
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-00001.tar") as err:
        ShardSet(shard_dir)
    assert "corrupt" in str(err.value)


def test_missing_shard_error_names_file(shard_dir):
    (shard_dir / "shard-00002.tar").unlink()
    with pytest.raises(ShardError, match=r"missing: .*shard-00002.tar"):
        ShardSet(shard_dir)


def test_missing_manifest_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ShardSet(tmp_path)


def test_rerun_does_not_rewrite_and_repairs(shard_dir, small_docs, tokenizer_path):
    files = sorted(shard_dir.iterdir())
    mtimes = {p.name: p.stat().st_mtime_ns for p in files}
    write_shards(small_docs, shard_dir, tokenizer_path=tokenizer_path, num_shards=3, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in sorted(shard_dir.iterdir())} == mtimes
    # A damaged directory is rebuilt, not reused.
    (shard_dir / "shard-00000.tar").unlink()
    write_shards(small_docs, shard_dir, tokenizer_path=tokenizer_path, num_shards=3, progress=False)
    ShardSet(shard_dir)


def test_parallel_equals_serial(tmp_path, small_docs, tokenizer_path):
    serial = write_shards(small_docs, tmp_path / "a", tokenizer_path=tokenizer_path, num_shards=3,
                          num_workers=1, progress=False)
    parallel = write_shards(small_docs, tmp_path / "b", tokenizer_path=tokenizer_path, num_shards=3,
                            num_workers=2, progress=False)
    assert [s["sha256"] for s in serial["shards"]] == [s["sha256"] for s in parallel["shards"]]
    assert not list((tmp_path / "b").glob(".*tmp"))  # no temp files left behind
