"""``megafire prep {tokenizer,shards}``: the data-preparation entry points the CLI dispatches to.

Both steps are idempotent, so a pipeline can run them unconditionally:
    megafire prep tokenizer --corpus default --out data/tok --vocab-size 4096
    megafire prep shards --corpus default --tokenizer data/tok --out data/shards/train --split train
    megafire prep shards --corpus default --tokenizer data/tok --out data/shards/eval --split eval
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .corpus import SPLITS, corpus_info, load_corpus
from .shards import write_shards
from .tokenizer import MODEL_TYPES, Tokenizer, train_tokenizer


def prep_tokenizer(corpus: str | os.PathLike = "default", out_dir: str | os.PathLike = "data/tokenizer",
                   vocab_size: int = 4096, model_type: str = "bpe", *, split: str = "train",
                   force: bool = False) -> Path:
    """Train (or reuse) the tokenizer; returns the ``tokenizer.model`` path."""
    path = train_tokenizer(corpus, out_dir, vocab_size, model_type, split=split, force=force)
    tok = Tokenizer(path)
    print(f"tokenizer: {path} vocab_size={tok.vocab_size} sha256={tok.checksum[:12]}")
    return path


def prep_shards(corpus: str | os.PathLike = "default", tokenizer_path: str | os.PathLike = "data/tokenizer",
                out_dir: str | os.PathLike = "data/shards/train", num_shards: int | None = None,
                docs_per_shard: int | None = None, num_workers: int | None = None, split: str = "train",
                force: bool = False, progress: bool = True) -> dict:
    """Tokenize one split of ``corpus`` into shards; returns the manifest.

    Defaults to one shard per ~64 documents (at least 2 shards so two DataLoader workers or
    two pool processes have work) when neither ``num_shards`` nor ``docs_per_shard`` is given.
    """
    Tokenizer(tokenizer_path)   # a missing tokenizer fails before the corpus is read
    docs = load_corpus(corpus, split)
    if num_shards is None and docs_per_shard is None:
        num_shards = max(2, -(-len(docs) // 64))
    manifest = write_shards(docs, out_dir, tokenizer_path=tokenizer_path, num_shards=num_shards,
                            docs_per_shard=docs_per_shard, num_workers=num_workers or min(8, os.cpu_count() or 1),
                            corpus=corpus_info(corpus, split), progress=progress, force=force)
    print(f"shards: {out_dir} {len(manifest['shards'])} shards, {manifest['num_docs']} docs, "
          f"{manifest['num_tokens']:,} tokens")
    return manifest


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``prep`` sub-commands; pass a parser to attach them under another CLI."""
    parser = parser or argparse.ArgumentParser(prog="megafire prep", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    tok = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer")
    tok.add_argument("--corpus", default="default", help='corpus file/dir or "default"')
    tok.add_argument("--out", required=True, help="output directory (tokenizer.model, tokenizer.json)")
    tok.add_argument("--vocab-size", type=int, default=4096)
    tok.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    tok.add_argument("--split", choices=SPLITS, default="train")
    tok.add_argument("--force", action="store_true", help="retrain even if up to date")
    sh = sub.add_parser("shards", help="tokenize a corpus split into webdataset shards")
    sh.add_argument("--corpus", default="default")
    sh.add_argument("--tokenizer", required=True, help="tokenizer.model or its directory")
    sh.add_argument("--out", required=True)
    group = sh.add_mutually_exclusive_group()
    group.add_argument("--num-shards", type=int)
    group.add_argument("--docs-per-shard", type=int)
    sh.add_argument("--num-workers", type=int)
    sh.add_argument("--split", choices=SPLITS, default="train")
    sh.add_argument("--force", action="store_true", help="rewrite even if up to date")
    sh.add_argument("--no-progress", action="store_true")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.what == "tokenizer":
        prep_tokenizer(args.corpus, args.out, args.vocab_size, args.model_type, split=args.split, force=args.force)
    else:
        prep_shards(args.corpus, args.tokenizer, args.out, num_shards=args.num_shards,
                    docs_per_shard=args.docs_per_shard, num_workers=args.num_workers, split=args.split,
                    force=args.force, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
