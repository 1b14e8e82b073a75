"""On-demand data next to run.dir: reused only for the corpus it was built from."""
from __future__ import annotations

import json

import pytest

from megafire.config import ConfigError, MissingFileError, load_config
from megafire.data.corpus import load_corpus
from megafire.train.data_adapter import _prepare, data_paths


def _plain(path, docs):
    path.write_text("".join(json.dumps({"text": d.text[:12_000]}) + "\n" for d in docs))
    return path


def test_default_data_dir_serves_only_its_corpus(tmp_path):
    docs = load_corpus("default")[:6]
    a, b = _plain(tmp_path / "a.jsonl", docs), _plain(tmp_path / "b.jsonl", docs[1:])

    def cfg(corpus):
        return load_config(None, [f"--run.dir={tmp_path / 'runs' / 'x'}", f"--data.corpus={corpus}",
                                  "--model.vocab_size=600"])
    tok_dir, shard_dir, may_build = data_paths(cfg(a))
    assert may_build
    _prepare(cfg(a), tok_dir, shard_dir, may_build)          # a plain JSONL: built with the default split
    assert json.loads((shard_dir / "manifest.json").read_text())["corpus"]["split"] == "train"
    _prepare(cfg(a), tok_dir, shard_dir, may_build)          # the same corpus: reused
    with pytest.raises(ConfigError, match=r"data.corpus=.*b\.jsonl.*comes from .*a\.jsonl"):
        _prepare(cfg(b), tok_dir, shard_dir, may_build)
    with pytest.raises(MissingFileError, match="nope.jsonl does not exist"):
        _prepare(cfg(tmp_path / "nope.jsonl"), tok_dir, shard_dir, may_build)
