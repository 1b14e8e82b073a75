"""Document corpora: JSONL(.gz) files of ``{"id", "title", "text"}`` plus a metadata sidecar.

A corpus is ``<name>.jsonl[.gz]`` with one document per line and ``<name>.meta.json`` beside it.
The sidecar holds the held-out split as an explicit list of evaluation document ids, chosen
deliberately by the corpus builder: length-generalization evaluation needs documents of 16x+
the training length, and a hash split can miss every long document (or leak a second edition
of an evaluation text into training). ``"default"`` names the corpus shipped inside the
package (Shakespeare and Milton from Project Gutenberg, see ``megafire/data/default/README.md``).

A plain JSONL corpus needs only ``"text"`` per line (``"id"`` defaults to ``line-N``, ``"title"``
to the id). Without ``eval_ids`` the held-out split is made by :func:`default_held_out`, a
deterministic rule by length (the same idea as data_prep/build_debian_corpora.py: long
documents, every second one, never a hash), and a line on stderr names the documents it chose.
Every reading error is a :class:`CorpusError` naming ``file:line``.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from megafire.config import ConfigError, MissingFileError

DEFAULT_CORPUS = Path(__file__).resolve().parent / "default" / "corpus.jsonl.gz"
SPLITS = ("all", "train", "eval")
#: without eval_ids: hold out every second document by length, longest first, until this
#: fraction of the characters is held out (at least one document)
EVAL_FRACTION = 0.05


class CorpusError(ConfigError):
    """A corpus that cannot be read: the message starts with ``file:line`` (1-based)."""


@dataclass(frozen=True)
class Document:
    """One document: a stable id, a human-readable title, the exact text, extra fields."""
    id: str
    title: str
    text: str
    extra: dict = field(default_factory=dict, compare=False)


def resolve_corpus_path(path: str | os.PathLike) -> Path:
    """``"default"`` -> the embedded corpus; a directory -> the single ``*.jsonl[.gz]`` in it."""
    if str(path) == "default":
        return DEFAULT_CORPUS
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.jsonl.gz")) + sorted(p.glob("*.jsonl"))
        if len(found) != 1:
            raise MissingFileError(f"corpus directory {p} must hold exactly one *.jsonl[.gz] file, "
                                   f"found {len(found)}")
        return found[0]
    if not p.is_file():
        raise MissingFileError(f"corpus {p} does not exist (data.corpus / --corpus: a .jsonl[.gz] file, "
                               f"a directory holding one, or \"default\")")
    return p


def meta_path(corpus_path: str | os.PathLike) -> Path:
    """``corpus.jsonl.gz`` -> ``corpus.meta.json`` (same directory)."""
    p = Path(corpus_path)
    stem = re.sub(r"\.jsonl(\.gz)?$", "", p.name)
    return p.with_name(stem + ".meta.json")


def iter_corpus(path: str | os.PathLike = "default") -> Iterator[Document]:
    """Stream documents in file order (memory stays flat for large corpora)."""
    p = resolve_corpus_path(path)
    line_no, offset = 0, 0   # offset: bytes before the current line (decompressed, for .gz)
    try:
        with (gzip.open(p, "rb") if p.name.endswith(".gz") else open(p, "rb")) as f:
            for line_no, raw in enumerate(f, 1):
                doc = _parse_line(raw, p, line_no, offset)
                offset += len(raw)
                if doc is not None:
                    yield doc
    except (OSError, EOFError, zlib.error) as e:   # truncated or corrupt gzip, unreadable file
        raise CorpusError(f"{p}:{line_no + 1}: cannot read the file: {e}") from None


def _parse_line(raw: bytes, p: Path, line_no: int, offset: int) -> Document | None:
    where = f"{p}:{line_no}"
    if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):   # a UTF-8 byte-order mark
        raw, offset = raw[3:], offset + 3
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{where}: invalid UTF-8 at byte {offset + e.start} of the file "
                          f"(column {e.start + 1}): {e.reason}") from None
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(rec, dict):
        raise CorpusError(f"{where}: a record must be a JSON object with a \"text\" string, "
                          f"got {type(rec).__name__}")
    if "text" not in rec:
        raise CorpusError(f"{where}: record lacks \"text\" (it has {', '.join(map(repr, rec)) or 'no keys'})")
    text = rec.pop("text")
    if not isinstance(text, str):
        raise CorpusError(f"{where}: \"text\" must be a string, got {type(text).__name__}")
    doc_id = str(rec.pop("id", f"line-{line_no}"))
    return Document(doc_id, str(rec.pop("title", doc_id)), text, rec)


def load_corpus_meta(path: str | os.PathLike = "default") -> dict:
    """The sidecar metadata (source, license, ``eval_ids``); ``{}`` when there is none."""
    mp = meta_path(resolve_corpus_path(path))
    if not mp.is_file():
        return {}
    try:
        meta = json.loads(mp.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CorpusError(f"{mp}: invalid UTF-8 at byte {e.start}: {e.reason}") from None
    except json.JSONDecodeError as e:
        raise CorpusError(f"{mp}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("eval_ids", []), list):
        raise CorpusError(f"{mp}: must hold a JSON object whose \"eval_ids\" is a list of document ids")
    return meta


def load_corpus(path: str | os.PathLike = "default", split: str = "all") -> list[Document]:
    """All documents of a corpus, or one side of its held-out split.

    The split is the sidecar's ``eval_ids`` when it has them, else :func:`default_held_out`
    (announced on stderr); ``train`` and ``eval`` are disjoint and together the whole corpus.
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    docs = list(iter_corpus(path))
    if split == "all":
        return docs
    p = resolve_corpus_path(path)
    eval_ids = load_corpus_meta(p).get("eval_ids")
    if eval_ids is None:
        held = set(default_held_out(docs, where=p))
        return [d for i, d in enumerate(docs) if (i in held) == (split == "eval")]
    try:
        train, held_out = split_documents(docs, eval_ids)
    except CorpusError as e:
        raise CorpusError(f"{meta_path(p)}: {e}") from None
    return train if split == "train" else held_out


_announced: set[Path] = set()


def default_held_out(docs: Sequence[Document], *, where: Path | None = None) -> list[int]:
    """Indices of the documents held out when a corpus names no ``eval_ids``.

    Rank the documents by length, longest first (file order breaks ties), and take every
    second one starting with the longest until ``EVAL_FRACTION`` of the characters are held
    out. Length-generalization evaluation needs long documents, which a hash split
    can miss; taking every second one leaves long documents for training too. Deterministic:
    the same file gives the same split in every run and process.
    """
    if len(docs) < 2:
        raise CorpusError(f"{where}: cannot hold out documents from a corpus of {len(docs)} document(s); "
                          f"add documents, list \"eval_ids\" in {meta_path(where).name if where else 'its meta.json'}, "
                          f"or use --split all")
    ranked = sorted(range(len(docs)), key=lambda i: (-len(docs[i].text), i))
    total = sum(len(d.text) for d in docs)
    held, chars = [], 0
    for i in ranked[::2]:
        held.append(i)
        chars += len(docs[i].text)
        if chars >= EVAL_FRACTION * total:
            break
    held.sort()
    if where is not None and where not in _announced:
        _announced.add(where)
        ids = ", ".join(docs[i].id for i in held[:5]) + (", ..." if len(held) > 5 else "")
        print(f"corpus {where}: no eval_ids in {meta_path(where).name}; holding out {len(held)} of {len(docs)} "
              f"documents ({chars / max(1, total):.1%} of the text) as the eval split: every second document by "
              f"length, longest first, until {EVAL_FRACTION:.0%} of the text ({ids}); to choose others, list "
              f"their ids as \"eval_ids\" in {meta_path(where).name}", file=sys.stderr)
    return held


def split_documents(docs: Sequence[Document], eval_ids: Iterable[str]) -> tuple[list[Document], list[Document]]:
    """(train, eval) by an explicit id list; order is preserved; unknown ids are an error."""
    eval_ids = set(eval_ids)
    known = {d.id for d in docs}
    missing = sorted(eval_ids - known)
    if missing:
        raise CorpusError(f"eval ids not in corpus: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    train = [d for d in docs if d.id not in eval_ids]
    held_out = [d for d in docs if d.id in eval_ids]
    return train, held_out


# The brief names it ``split``; keep both spellings.
split = split_documents


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def corpus_info(path: str | os.PathLike = "default", split: str = "all") -> dict:
    """What identifies the corpus input of a tokenizer or shard build (for idempotence checks)."""
    p = resolve_corpus_path(path)
    return {"path": str(p), "sha256": file_sha256(p), "split": split}


def write_corpus(docs: Iterable[Document], path: str | os.PathLike, *, eval_ids: Sequence[str] = (),
                 meta: dict | None = None) -> dict:
    """Write ``docs`` as JSONL (gzip when the name ends in .gz) plus the metadata sidecar.

    Output bytes are reproducible (gzip mtime 0, sorted keys) so a rebuild from the same
    sources gives the same checksum. Returns the metadata written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    stats = {"num_docs": 0, "num_chars": 0}
    seen: set[str] = set()
    raw = open(tmp, "wb")
    stream = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") if path.name.endswith(".gz") else raw
    with raw, stream:
        for d in docs:
            if d.id in seen:
                raise ConfigError(f"duplicate document id {d.id!r}")
            seen.add(d.id)
            rec = {"id": d.id, "title": d.title, "text": d.text, **d.extra}
            stream.write((json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
            stats["num_docs"] += 1
            stats["num_chars"] += len(d.text)
    missing = sorted(set(eval_ids) - seen)
    if missing:
        tmp.unlink()
        raise ConfigError(f"eval ids not among written documents: {missing}")
    os.replace(tmp, path)
    full_meta = {**(meta or {}), **stats, "eval_ids": list(eval_ids), "sha256": file_sha256(path)}
    mp = meta_path(path)
    mp.write_text(json.dumps(full_meta, indent=1, ensure_ascii=False) + "\n")
    return full_meta
