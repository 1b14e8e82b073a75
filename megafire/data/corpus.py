"""Document corpora: JSONL(.gz) files of ``{"id", "title", "text"}`` plus a metadata sidecar.

A corpus is ``<name>.jsonl[.gz]`` with one document per line and ``<name>.meta.json`` beside it.
The sidecar holds the held-out split as an explicit list of evaluation document ids, chosen
deliberately by the corpus builder: length-generalization evaluation needs documents of 16x+
the training length, and a hash split can miss every long document (or leak a second edition
of an evaluation text into training). ``"default"`` names the corpus shipped inside the
package (Shakespeare and Milton from Project Gutenberg, see ``megafire/data/default/README.md``).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

DEFAULT_CORPUS = Path(__file__).resolve().parent / "default" / "corpus.jsonl.gz"
SPLITS = ("all", "train", "eval")


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
            raise FileNotFoundError(f"expected exactly one *.jsonl[.gz] corpus in {p}, found {len(found)}")
        return found[0]
    if not p.is_file():
        raise FileNotFoundError(f"corpus file not found: {p}")
    return p


def meta_path(corpus_path: str | os.PathLike) -> Path:
    """``corpus.jsonl.gz`` -> ``corpus.meta.json`` (same directory)."""
    p = Path(corpus_path)
    stem = re.sub(r"\.jsonl(\.gz)?$", "", p.name)
    return p.with_name(stem + ".meta.json")


def _open_text(path: Path, mode: str):
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, mode + "b"), encoding="utf-8", newline="")
    return open(path, mode, encoding="utf-8", newline="")


def iter_corpus(path: str | os.PathLike = "default") -> Iterator[Document]:
    """Stream documents in file order (memory stays flat for large corpora)."""
    p = resolve_corpus_path(path)
    with _open_text(p, "r") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            try:
                doc_id, text = str(rec.pop("id")), rec.pop("text")
            except KeyError as e:
                raise ValueError(f"{p}:{line_no}: record lacks field {e}") from None
            yield Document(doc_id, str(rec.pop("title", doc_id)), text, rec)


def load_corpus_meta(path: str | os.PathLike = "default") -> dict:
    """The sidecar metadata (source, license, ``eval_ids``); ``{}`` when there is none."""
    mp = meta_path(resolve_corpus_path(path))
    return json.loads(mp.read_text()) if mp.is_file() else {}


def load_corpus(path: str | os.PathLike = "default", split: str = "all") -> list[Document]:
    """All documents of a corpus, or one side of its stored held-out split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    docs = list(iter_corpus(path))
    if split == "all":
        return docs
    eval_ids = load_corpus_meta(path).get("eval_ids")
    if eval_ids is None:
        raise ValueError(f"corpus {resolve_corpus_path(path)} has no eval_ids in "
                         f"{meta_path(resolve_corpus_path(path)).name}; cannot take split {split!r}")
    train, held_out = split_documents(docs, eval_ids)
    return train if split == "train" else held_out


def split_documents(docs: Sequence[Document], eval_ids: Iterable[str]) -> tuple[list[Document], list[Document]]:
    """(train, eval) by an explicit id list; order is preserved; unknown ids are an error."""
    eval_ids = set(eval_ids)
    known = {d.id for d in docs}
    missing = sorted(eval_ids - known)
    if missing:
        raise ValueError(f"eval ids not in corpus: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
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
                raise ValueError(f"duplicate document id {d.id!r}")
            seen.add(d.id)
            rec = {"id": d.id, "title": d.title, "text": d.text, **d.extra}
            stream.write((json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
            stats["num_docs"] += 1
            stats["num_chars"] += len(d.text)
    missing = sorted(set(eval_ids) - seen)
    if missing:
        tmp.unlink()
        raise ValueError(f"eval ids not among written documents: {missing}")
    os.replace(tmp, path)
    full_meta = {**(meta or {}), **stats, "eval_ids": list(eval_ids), "sha256": file_sha256(path)}
    mp = meta_path(path)
    mp.write_text(json.dumps(full_meta, indent=1, ensure_ascii=False) + "\n")
    return full_meta
