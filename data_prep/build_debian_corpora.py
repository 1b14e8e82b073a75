#!/usr/bin/env python3
"""Build the larger corpus for serious runs from text that Debian packages (and Python) put on disk.

Writes ``OUT/debian.jsonl.gz`` (``id``, ``title``, ``text``, ``source``) and
``OUT/debian.meta.json`` with a deliberate held-out split, the same format as the embedded
default corpus, so ``megafire prep tokenizer --corpus OUT`` works unchanged.

Sources (ids are ``<source>/<path>``):
  python_docs    python3.11-doc      reST sources of docs.python.org
  perl_pod       perl-doc            perl's POD manual pages
  postgres_docs  postgresql-doc-15   HTML manual, converted to text
  deb_handbook   debian-handbook     HTML book, converted to text
  kernel_docs    linux-source-6.1    Documentation/**/*.rst|txt (no translations)
  kjv            bible-kjv           King James Bible, one document per book (public domain)
  python_code    (none)              the interpreter's own standard library *.py

``--install`` runs ``apt-get install`` for the packages of the chosen sources (this also
upgrades perl/python/postgresql packages: do it on a scratch machine or in CI images).
Missing packages are reported and their source skipped.

Held-out split: per source, the documents of at least ``--eval-min-chars`` characters
(64k chars is ~16k tokens: 16x a 1k training length) sorted by id, every k-th one so that
about ``--eval-fraction`` of the source's characters is held out. Chosen by length, not by
hash, so the evaluation set always contains long documents.
Usage: python data_prep/build_debian_corpora.py OUT [--sources a,b] [--install] [--max-docs N]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import sysconfig
import tarfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterator

from megafire.data.cleaning import decode_text, normalize_layout
from megafire.data.corpus import Document, write_corpus

PACKAGES = {"python_docs": ["python3.11-doc"], "perl_pod": ["perl-doc"], "postgres_docs": ["postgresql-doc-15"],
            "deb_handbook": ["debian-handbook"], "kernel_docs": ["linux-source-6.1"],
            "kjv": ["bible-kjv", "bible-kjv-text"], "python_code": []}


class _HtmlText(HTMLParser):
    """HTML -> text keeping block structure as newlines; scripts, styles and navigation dropped."""
    SKIP = {"script", "style", "head", "nav"}
    BLOCK = {"p", "div", "br", "li", "tr", "pre", "dt", "dd", "table", "section", "blockquote",
             "h1", "h2", "h3", "h4", "h5", "h6"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skipping = [], 0

    def handle_starttag(self, tag, attrs):
        self.skipping += tag in self.SKIP
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _HtmlText()
    parser.feed(html)
    text = re.sub(r"[ \t\f\v]+\n", "\n", "".join(parser.parts))
    return re.sub(r"\n{3,}", "\n\n", text)


def _files(root: Path, pattern: str, package: str) -> list[Path]:
    if not root.exists():
        raise FileNotFoundError(f"{root} missing: apt-get install {package}")
    return sorted(p for p in root.rglob(pattern) if p.is_file())


def src_python_docs() -> Iterator[tuple[str, str, str]]:
    root = Path("/usr/share/doc/python3.11/html/_sources")
    for p in _files(root, "*.txt", "python3.11-doc"):
        yield str(p.relative_to(root)), p.stem, p.read_text(errors="replace")


def src_perl_pod():
    root = Path("/usr/share/perl/5.36/pod")
    for p in _files(root, "*.pod", "perl-doc"):
        yield p.name, p.stem, p.read_text(errors="replace")


def src_postgres_docs():
    root = Path("/usr/share/doc/postgresql-doc-15/html")
    for p in _files(root, "*.html", "postgresql-doc-15"):
        yield p.name, p.stem, html_to_text(p.read_text(errors="replace"))


def src_deb_handbook():
    root = Path("/usr/share/doc/debian-handbook/html/en-US")
    for p in _files(root, "*.html", "debian-handbook"):
        yield str(p.relative_to(root)), p.stem, html_to_text(p.read_text(errors="replace"))


def src_kernel_docs():
    tarball = Path("/usr/src/linux-source-6.1.tar.xz")
    if not tarball.exists():
        raise FileNotFoundError(f"{tarball} missing: apt-get install linux-source-6.1")
    with tarfile.open(tarball) as tf:  # streamed: no 1 GB unpack needed for the docs
        for m in tf:
            parts = Path(m.name).parts
            if (m.isfile() and "Documentation" in parts and "translations" not in parts
                    and m.name.endswith((".rst", ".txt"))):
                yield m.name.split("/", 1)[1], Path(m.name).stem, decode_text(tf.extractfile(m).read())


def src_kjv():
    """``bible`` (package bible-kjv) prints the text; chapters are grouped into one document per book."""
    out = subprocess.run(["bible", "-f", "-l", "100000", "gen1:1-rev22:21"], capture_output=True, text=True,
                         check=True).stdout
    book, lines = None, []
    for line in out.splitlines():
        # bible-kjv 4.x prints "Ge1:1 ...", "1Sm1:1 ..." (abbreviation glued to the chapter)
        m = re.match(r"^([1-3]?\s?[A-Z][A-Za-z ]*?)\s?\d+:\d+", line)
        name = m.group(1) if m else book
        if name != book and lines:
            yield book, book, "\n".join(lines)
            lines = []
        book = name
        lines.append(line)
    if lines:
        yield book, book, "\n".join(lines)


def src_python_code():
    root = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(root.rglob("*.py")):
        if {"site-packages", "test", "tests", "idle_test"} & set(p.parts):
            continue
        yield str(p.relative_to(root)), p.name, p.read_text(errors="replace")


SOURCES: dict[str, Callable[[], Iterator[tuple[str, str, str]]]] = {
    "python_docs": src_python_docs, "perl_pod": src_perl_pod, "postgres_docs": src_postgres_docs,
    "deb_handbook": src_deb_handbook, "kernel_docs": src_kernel_docs, "kjv": src_kjv,
    "python_code": src_python_code,
}


def choose_eval(docs: list[Document], min_chars: int, fraction: float) -> list[str]:
    """Per source: every k-th long document (by id) so ~``fraction`` of the source's text is held out."""
    chosen = []
    for source in sorted({d.extra["source"] for d in docs}):
        mine = [d for d in docs if d.extra["source"] == source]
        long_docs = sorted((d for d in mine if len(d.text) >= min_chars), key=lambda d: d.id)
        if not long_docs:
            continue
        total = sum(len(d.text) for d in mine)
        mean_long = sum(len(d.text) for d in long_docs) / len(long_docs)
        want = max(1, round(fraction * total / mean_long))
        step = max(1, len(long_docs) // want)
        chosen += [d.id for d in long_docs[step // 2::step][:want]]
    return chosen


def collect(sources: list[str], max_docs: int | None) -> list[Document]:
    docs = []
    for source in sources:
        try:
            n = 0
            for path, title, text in SOURCES[source]():
                text = normalize_layout(text)
                if not text.strip():
                    continue
                docs.append(Document(f"{source}/{path}", title, text, {"source": source}))
                n += 1
                if max_docs and n >= max_docs:
                    break
            print(f"{source}: {n} documents", file=sys.stderr)
        except (FileNotFoundError, subprocess.CalledProcessError) as err:
            print(f"{source}: skipped ({err})", file=sys.stderr)
    return docs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--sources", default=",".join(SOURCES), help=f"comma list of {sorted(SOURCES)}")
    ap.add_argument("--install", action="store_true", help="apt-get install the needed packages first")
    ap.add_argument("--max-docs", type=int, help="per source (for quick checks)")
    ap.add_argument("--eval-min-chars", type=int, default=65_536)
    ap.add_argument("--eval-fraction", type=float, default=0.05)
    args = ap.parse_args(argv)
    sources = [s for s in args.sources.split(",") if s]
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        ap.error(f"unknown sources {unknown}; choose from {sorted(SOURCES)}")
    if args.install:
        packages = sorted({p for s in sources for p in PACKAGES[s]})
        if packages:
            subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *packages], check=True)
    docs = collect(sources, args.max_docs)
    if not docs:
        print("no documents collected", file=sys.stderr)
        return 1
    eval_ids = choose_eval(docs, args.eval_min_chars, args.eval_fraction)
    meta = write_corpus(docs, args.out / "debian.jsonl.gz", eval_ids=eval_ids, meta={
        "name": "debian", "sources": sources, "builder": "data_prep/build_debian_corpora.py",
        "license": "per package: see /usr/share/doc/<package>/copyright (PSF, Artistic/GPL, "
                   "PostgreSQL, GPL-2 for kernel docs, public domain for the KJV)",
        "split_rule": f"per source every k-th document >= {args.eval_min_chars} chars, "
                      f"~{args.eval_fraction:.0%} of its text"})
    print(f"wrote {args.out}: {meta['num_docs']} docs, {meta['num_chars']:,} chars, {len(eval_ids)} eval docs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
