#!/usr/bin/env python3
"""Build the data of the length-generalization study (issue 14) from nothing, deterministically.

    .venv/bin/python data_prep/build_study_data.py study_data [--install]

Steps (each idempotent; a second run reuses what is there and checks it):
1. ``build_debian_corpora.py`` -> ``OUT/raw/prose`` (python_docs, perl_pod, postgres_docs,
   deb_handbook, kernel_docs, kjv) and ``OUT/raw/code`` (python_code: the standard library of
   the interpreter running this script; its version is recorded in the metadata).
2. Held-out documents, chosen by length, not by hash: per source, of the documents with at
   least ``--eval-min-chars`` characters (no generated index pages), every k-th by id, for
   ``--prose-eval`` prose documents spread over the sources and ``--code-eval`` code files.
   Everything else is training data: prose AND code (the code set is then in-domain, so
   its curve measures length generalization on a second kind of text, not domain shift).
3. ``OUT/corpus/study.jsonl.gz``: the training documents, in a fixed order (sorted by id).
   ``OUT/gpu/eval/{prose,code}/heldout.jsonl.gz``: corpora whose ``eval`` split is all of their
   documents, so ``megafire eval`` with ``data.corpus: OUT/gpu/eval/prose`` reads them.
4. Tokenizer (sentencepiece BPE, ``--vocab-size`` 16384, lossless) on the training documents;
   shards of the training documents in ``OUT/shards/train`` (uint16 tokens in webdataset tars),
   packed as ``OUT/gpu/shards.tar.xz`` for the trip to the GPU machine.
5. Held-out documents shorter than ``--min-eval-tokens`` (8192 = 16 x 512) after
   tokenization are dropped from the eval corpora; ``OUT/gpu/study_data.json`` records the sizes.

What the GPU machine needs is ``OUT/gpu`` (one carry path: ``tokenizer/``, ``shards.tar.xz``,
``eval/``; ~16 MiB); ``megafire study run`` unpacks the shards to ``OUT/shards/train`` there
(outside the carried folder, so a later call's carry cannot remove them under a running arm).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROSE = ("python_docs", "perl_pod", "postgres_docs", "deb_handbook", "kernel_docs", "kjv")
CODE = ("python_code",)
SHARDS_ARCHIVE = "shards.tar.xz"


def pack_shards(shard_root: Path, archive: Path) -> None:
    """``shard_root/train/*`` -> one xz tar (reproducible: sorted names, mtime 0, root owner).

    The shards are tars of uint16 arrays with 512-byte member padding (~2 KB per document):
    50 MiB for 18.5M tokens, 13.7 MiB as xz. The study command unpacks it on the GPU side
    (megafire.study.ensure_shards)."""
    import tarfile
    if archive.is_file() and archive.stat().st_mtime >= max(p.stat().st_mtime for p in shard_root.rglob("*")):
        return
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:xz", preset=6, format=tarfile.USTAR_FORMAT) as tf:
        for path in sorted(p for p in shard_root.rglob("*") if p.is_file()):
            info = tarfile.TarInfo(str(path.relative_to(shard_root)))
            info.size, info.mtime, info.mode, info.uid, info.gid = path.stat().st_size, 0, 0o644, 0, 0
            with open(path, "rb") as f:
                tf.addfile(info, f)
    tmp.replace(archive)


def _dir_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def build_raw(out: Path, install: bool) -> None:
    for name, sources in (("prose", PROSE), ("code", CODE)):
        dest = out / "raw" / name
        if (dest / "debian.meta.json").is_file():
            continue
        cmd = [sys.executable, str(ROOT / "data_prep" / "build_debian_corpora.py"), str(dest),
               "--sources", ",".join(sources)] + (["--install"] if install and name == "prose" else [])
        subprocess.run(cmd, check=True)


def every_kth(docs: list, want: int) -> list:
    """``want`` documents spread evenly over ``docs`` (already in a fixed order)."""
    if want >= len(docs):
        return list(docs)
    step = len(docs) / want
    return [docs[int(step * i + step / 2)] for i in range(want)]


def choose_heldout(docs: list, sources: tuple, want: int, min_chars: int) -> list:
    """Per source, long documents every k-th by id; the count per source follows its share of
    the long documents (at least one per source that has any)."""
    long_by_source = {s: sorted((d for d in docs if d.extra["source"] == s and len(d.text) >= min_chars
                                 and "index" not in d.id.lower()), key=lambda d: d.id) for s in sources}
    long_by_source = {s: v for s, v in long_by_source.items() if v}
    total = sum(len(v) for v in long_by_source.values())
    chosen = []
    for s, v in sorted(long_by_source.items()):
        k = max(1, round(want * len(v) / total))
        chosen += every_kth(v, min(k, len(v)))
    return chosen


def write_eval(docs: list, path: Path, meta: dict) -> None:
    from megafire.data.corpus import write_corpus
    write_corpus(docs, path, eval_ids=[d.id for d in docs], meta=meta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, nargs="?", default=ROOT / "study_data")
    ap.add_argument("--install", action="store_true", help="apt-get install the doc packages first")
    ap.add_argument("--vocab-size", type=int, default=16384)
    ap.add_argument("--prose-eval", type=int, default=36, help="held-out prose documents (before the token check)")
    ap.add_argument("--code-eval", type=int, default=28, help="held-out code files (before the token check)")
    ap.add_argument("--eval-min-chars", type=int, default=40_000)
    ap.add_argument("--min-eval-tokens", type=int, default=8192)
    ap.add_argument("--num-shards", type=int, default=16)
    args = ap.parse_args(argv)
    out = args.out.resolve()
    sys.path.insert(0, str(ROOT))
    from megafire.data.corpus import load_corpus, write_corpus
    from megafire.data.prep import prep_shards, prep_tokenizer
    from megafire.data.tokenizer import Tokenizer

    gpu = out / "gpu"
    build_raw(out, args.install)
    prose = load_corpus(out / "raw" / "prose")
    code = load_corpus(out / "raw" / "code")
    held_prose = choose_heldout(prose, PROSE, args.prose_eval, args.eval_min_chars)
    held_code = choose_heldout(code, CODE, args.code_eval, args.eval_min_chars)
    held_ids = {d.id for d in held_prose + held_code}
    train = sorted((d for d in prose + code if d.id not in held_ids), key=lambda d: d.id)
    rule = (f"per source every k-th document >= {args.eval_min_chars} chars by id (no index pages), "
            f"then >= {args.min_eval_tokens} tokens")
    write_corpus(train, out / "corpus" / "study.jsonl.gz", eval_ids=[], meta={
        "name": "study-train", "builder": "data_prep/build_study_data.py", "sources": [*PROSE, *CODE],
        "python_stdlib": sysconfig.get_paths()["stdlib"], "held_out_rule": rule})

    tok_path = prep_tokenizer(out / "corpus", gpu / "tokenizer", args.vocab_size, "bpe", split="train")
    manifest = prep_shards(out / "corpus", tok_path, out / "shards" / "train", num_shards=args.num_shards,
                           split="train", progress=False)
    pack_shards(out / "shards", gpu / SHARDS_ARCHIVE)
    tok = Tokenizer(tok_path)
    sizes = {}
    for name, held in (("prose", held_prose), ("code", held_code)):
        lengths = {d.id: len(tok.encode(d.text)) for d in held}
        kept = [d for d in held if lengths[d.id] >= args.min_eval_tokens]
        write_eval(kept, gpu / "eval" / name / "heldout.jsonl.gz",
                   {"name": f"study-eval-{name}", "builder": "data_prep/build_study_data.py", "split_rule": rule})
        sizes[name] = {"num_docs": len(kept), "dropped_short": len(held) - len(kept),
                       "tokens": {d.id: lengths[d.id] for d in kept},
                       "min_tokens": min((lengths[d.id] for d in kept), default=0)}
    summary = {"train": {"num_docs": manifest["num_docs"], "num_tokens": manifest["num_tokens"],
                         "shards_mib": round(_dir_mib(out / "shards"), 2),
                         "archive_mib": round((gpu / SHARDS_ARCHIVE).stat().st_size / 2**20, 2)},
               "tokenizer": {"vocab_size": tok.vocab_size, "sha256": tok.checksum,
                             "mib": round(_dir_mib(gpu / "tokenizer"), 2)},
               "eval": sizes, "eval_mib": round(_dir_mib(gpu / "eval"), 2),
               "carry_mib": round(_dir_mib(gpu), 2)}
    (gpu / "study_data.json").write_text(json.dumps(summary, indent=1) + "\n")   # travels with the data
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=1))
    for name, s in sizes.items():
        print(f"eval {name}: {s['num_docs']} documents >= {args.min_eval_tokens} tokens "
              f"(shortest {s['min_tokens']}, {s['dropped_short']} dropped)")
    rel = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    print(f"carry: {rel}/gpu ({summary['carry_mib']} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
