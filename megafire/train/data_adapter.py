"""The megafire.data loader behind the trainer's BatchSource interface, with on-demand prep.

Paths: ``data.tokenizer_dir`` (default ``{run.dir}/../data/tokenizer``) and
``data.shards_dir`` (default ``{tokenizer_dir}/../shards/train``). When a default path
holds nothing yet, rank 0 builds it (tokenizer of ``model.vocab_size`` pieces, then the
train split's shards) while the other ranks wait; explicit paths must exist. The tokenizer
is checked against the model's vocabulary and against the tokenizer the shards were
tokenized with, before any training.
"""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from megafire.config import Config, ConfigError

from .components import DataBundle


class LoaderSource:
    """``next_batch(b, s)`` over a PackedLoader (whose position continues across shape changes)."""

    def __init__(self, loader):
        self.loader = loader

    def next_batch(self, micro_batch_size: int, seq_len: int) -> dict:
        self.loader.set_shape(seq_len, micro_batch_size)
        return next(self.loader)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def data_paths(cfg: Config) -> tuple[Path, Path, bool]:
    """(tokenizer dir, shards dir, whether missing data may be built here)."""
    tok = Path(cfg.data.tokenizer_dir) if cfg.data.tokenizer_dir else Path(cfg.run.dir).parent / "data" / "tokenizer"
    shards = Path(cfg.data.shards_dir) if cfg.data.shards_dir else tok.parent / "shards" / "train"
    return tok, shards, not (cfg.data.tokenizer_dir or cfg.data.shards_dir)


def _prepare(cfg: Config, tok_dir: Path, shard_dir: Path, may_build: bool) -> None:
    from megafire.data.prep import prep_shards, prep_tokenizer
    from megafire.data.tokenizer import MODEL_FILE
    has_tok = (tok_dir / MODEL_FILE).is_file()
    has_shards = (shard_dir / "manifest.json").is_file()
    if has_tok and has_shards:
        if may_build:
            _check_built_from(cfg, shard_dir)
        return
    if not may_build:
        missing = str(tok_dir / MODEL_FILE) if not has_tok else str(shard_dir / "manifest.json")
        raise ConfigError(f"data: {missing} does not exist (data.tokenizer_dir / data.shards_dir); build it with "
                          "`megafire prep` or leave both empty to build next to run.dir")
    if not has_tok:
        prep_tokenizer(cfg.data.corpus, tok_dir, cfg.model.vocab_size, cfg.data.tokenizer_type)
    if not has_shards:
        prep_shards(cfg.data.corpus, tok_dir, shard_dir, progress=False)


def _check_built_from(cfg: Config, shard_dir: Path) -> None:
    """Data built on demand next to run.dir serves only the corpus it was built from: another
    data.corpus (or a typo in it) must not train on it silently."""
    from megafire.data.corpus import file_sha256, resolve_corpus_path
    from megafire.data.shards import read_manifest
    built = read_manifest(shard_dir).get("corpus") or {}
    corpus = resolve_corpus_path(cfg.data.corpus)   # a missing corpus is an error even when data exists
    if not built.get("path") or Path(built["path"]).resolve() == corpus.resolve() or \
            file_sha256(corpus) == built.get("sha256"):
        return
    raise ConfigError(f"data.corpus={cfg.data.corpus!r}, but the data in {shard_dir.parent.parent} (built on demand "
                      f"next to run.dir) comes from {built['path']}; put run.dir elsewhere or set "
                      f"data.tokenizer_dir and data.shards_dir")


def build_loader(cfg: Config, ctx) -> DataBundle:
    from megafire.data.loader import PackedLoader
    from megafire.data.shards import read_manifest
    from megafire.data.tokenizer import Tokenizer
    tok_dir, shard_dir, may_build = data_paths(cfg)
    failed = [None]
    if dist.get_rank() == 0:
        try:
            _prepare(cfg, tok_dir, shard_dir, may_build)
        except ConfigError as e:   # every rank raises it (one line each), none waits for data forever
            failed = [str(e)]
    dist.broadcast_object_list(failed, src=0)
    if failed[0] is not None:
        raise ConfigError(failed[0])
    _prepare(cfg, tok_dir, shard_dir, may_build=False)   # raises on ranks that cannot see the data
    tokenizer = Tokenizer(tok_dir)
    shard_tok = read_manifest(shard_dir)["tokenizer"]
    if shard_tok.get("checksum") not in (None, tokenizer.checksum):
        raise ConfigError(f"data: the shards in {shard_dir} were tokenized with tokenizer sha256 "
                          f"{shard_tok['checksum'][:12]}, but {tok_dir} holds {tokenizer.checksum[:12]}")
    first = cfg.stages()[0].seq_len
    loader = PackedLoader(shard_dir, seq_len=first, micro_batch_size=1, dp_rank=ctx.dp_rank,
                          dp_world_size=ctx.dp_size, seed=cfg.train.seed, reset_positions=cfg.data.reset_positions,
                          num_workers=cfg.data.num_workers)
    return DataBundle(LoaderSource(loader), tokenizer.checksum, tokenizer.vocab_size)
