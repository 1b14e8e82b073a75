"""Tokenized shards: webdataset-format ``.tar`` files plus a ``manifest.json`` that indexes them.

Each sample is one document: ``<doc_index>.tokens.npy`` (uint16 when the vocabulary fits,
else int32; no bos/eos, the loader adds the EOS separators) and ``<doc_index>.json``
(id, title, num_tokens). Any webdataset or tar reader can read the shards; the loader does
not need to, because the manifest records, per document, the byte offset of its token
array inside the tar, so documents are memory-mapped straight out of the shard with no
unpacking and no per-epoch re-read.

Writing is parallel (a process pool over shards), atomic (temp name + rename, manifest
last) and idempotent (skipped when the manifest's recorded inputs match and every shard
still checksums). Tar bytes are reproducible (mtime 0, fixed owner), so the same inputs
give the same sha256 on any machine. Opening verifies every shard's sha256 and names the
missing or corrupt file.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from megafire.config import ConfigError, MissingFileError

from .corpus import Document, file_sha256

MANIFEST = "manifest.json"
FORMAT = "megafire-shards/1"


class ShardError(ConfigError):
    """A shard is missing, corrupt, or does not match its manifest."""


@dataclass
class _ShardJob:
    """What one pool task needs: the documents of one shard and how to tokenize them."""
    index: int
    file: str
    first_doc: int
    docs: list          # [(id, title, text or np.ndarray of token ids)]
    tokenizer_path: str | None
    dtype: str


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def _npy_bytes(tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    return buf.getvalue()


def _add_member(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(payload))


def _write_shard(job: _ShardJob, out_dir: str) -> dict:
    """Tokenize and write one shard; returns its manifest record (runs in a pool worker)."""
    tokenizer = None
    if job.tokenizer_path is not None:
        from .tokenizer import Tokenizer  # loaded per worker: SentencePiece objects do not pickle
        tokenizer = Tokenizer(job.tokenizer_path)
    dtype = np.dtype(job.dtype)
    final = Path(out_dir) / job.file
    tmp = final.with_name(f".{job.file}.{os.getpid()}.tmp")
    lengths, header_bytes, ids = [], [], []
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for k, (doc_id, title, content) in enumerate(job.docs):
            tokens = np.asarray(tokenizer.encode(content) if isinstance(content, str) else content)
            if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
                raise ValueError(f"token ids of {doc_id!r} do not fit {dtype}")
            npy = _npy_bytes(tokens.astype(dtype, copy=False))
            key = f"{job.first_doc + k:09d}"
            _add_member(tf, key + ".tokens.npy", npy)
            meta = {"id": doc_id, "title": title, "num_tokens": int(tokens.size)}
            _add_member(tf, key + ".json", json.dumps(meta, ensure_ascii=False).encode())
            lengths.append(int(tokens.size))
            header_bytes.append(len(npy) - tokens.size * dtype.itemsize)
            ids.append(doc_id)
    # Where each token array starts inside the tar: tar data offset + .npy header length.
    with tarfile.open(tmp) as tf:
        data_offsets = [m.offset_data for m in tf.getmembers() if m.name.endswith(".tokens.npy")]
    offsets = [o + h for o, h in zip(data_offsets, header_bytes)]
    record = {"file": job.file, "num_docs": len(lengths), "num_tokens": int(sum(lengths)),
              "sha256": file_sha256(tmp), "first_doc": job.first_doc,
              "doc_ids": ids, "doc_num_tokens": lengths, "doc_offsets": offsets}
    os.replace(tmp, final)
    return record


def _run_jobs(jobs: list[_ShardJob], out_dir: Path, num_workers: int, progress: bool) -> list[dict]:
    bar = tqdm(total=len(jobs), desc=f"shards -> {out_dir.name}", unit="shard", disable=not progress)
    records = []
    if num_workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            records.append(_write_shard(job, str(out_dir)))
            bar.update()
    else:
        # spawn: the caller may have torch (and its threads) loaded; fork would copy that state.
        with mp.get_context("spawn").Pool(min(num_workers, len(jobs))) as pool:
            args = [(job, str(out_dir)) for job in jobs]
            for record in pool.imap_unordered(_star_write, args, chunksize=1):
                records.append(record)
                bar.update()
    bar.close()
    return sorted(records, key=lambda r: r["first_doc"])


def _star_write(args):
    return _write_shard(*args)


def _partition(num_docs: int, num_shards: int | None, docs_per_shard: int | None) -> list[range]:
    if (num_shards is None) == (docs_per_shard is None):
        raise ValueError("give exactly one of num_shards or docs_per_shard")
    if num_shards is None:
        num_shards = max(1, -(-num_docs // docs_per_shard))
    num_shards = max(1, min(num_shards, num_docs))
    bounds = [num_docs * i // num_shards for i in range(num_shards + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(num_shards)]


def _docs_fingerprint(docs: Sequence) -> str:
    h = hashlib.sha256()
    for doc_id, _title, content in docs:
        h.update(doc_id.encode() + b"\0")
        h.update(content.encode() if isinstance(content, str) else np.asarray(content, np.int64).tobytes())
        h.update(b"\0")
    return h.hexdigest()


def write_shards(docs: Sequence[Document] | Sequence[tuple], out_dir: str | os.PathLike, *,
                 tokenizer_path: str | os.PathLike | None = None, num_shards: int | None = None,
                 docs_per_shard: int | None = None, num_workers: int = 1, corpus: dict | None = None,
                 vocab_size: int | None = None, eos_id: int | None = None, progress: bool = True,
                 force: bool = False) -> dict:
    """Tokenize ``docs`` into shards under ``out_dir``; returns the manifest.

    ``docs`` are ``Document``s (tokenized with ``tokenizer_path``) or pre-tokenized
    ``(id, title, token_ids)`` tuples (then ``vocab_size`` and ``eos_id`` are required).
    ``corpus`` is recorded in the manifest (e.g. ``corpus_info(path, split)``).
    """
    items = [(d.id, d.title, d.text) if isinstance(d, Document) else tuple(d) for d in docs]
    if not items:
        raise ConfigError("no documents to shard")
    tok_meta = _tokenizer_meta(tokenizer_path, vocab_size, eos_id)
    dtype = token_dtype(tok_meta["vocab_size"])
    parts = _partition(len(items), num_shards, docs_per_shard)
    inputs = {"format": FORMAT, "tokenizer_sha256": tok_meta["checksum"], "docs_sha256": _docs_fingerprint(items),
              "num_docs": len(items), "num_shards": len(parts), "dtype": dtype.name}
    out = Path(out_dir)
    existing = _reusable_manifest(out, inputs)
    if existing is not None and not force:
        return existing
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(len(parts) - 1)))
    jobs = [_ShardJob(i, f"shard-{i:0{width}d}.tar", r.start, items[r.start:r.stop],
                      str(tokenizer_path) if tokenizer_path else None, dtype.name) for i, r in enumerate(parts)]
    records = _run_jobs(jobs, out, num_workers, progress)
    manifest = {"format": FORMAT, "inputs": inputs, "tokenizer": tok_meta, "corpus": corpus or {},
                "dtype": dtype.name, "num_docs": len(items),
                "num_tokens": int(sum(r["num_tokens"] for r in records)), "shards": records}
    tmp = out / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, ensure_ascii=False) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


def _tokenizer_meta(tokenizer_path, vocab_size, eos_id) -> dict:
    if tokenizer_path is not None:
        from .tokenizer import Tokenizer
        tok = Tokenizer(tokenizer_path)
        return {"path": str(tok.path), "checksum": tok.checksum, "vocab_size": tok.vocab_size,
                "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
    if vocab_size is None or eos_id is None:
        raise ValueError("pre-tokenized documents need vocab_size and eos_id")
    return {"path": None, "checksum": None, "vocab_size": int(vocab_size), "bos_id": None,
            "eos_id": int(eos_id), "pad_id": None}


def _reusable_manifest(out: Path, inputs: dict) -> dict | None:
    """The existing manifest when it was built from ``inputs`` and its shards are intact."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if manifest.get("inputs") != inputs:
        return None
    try:
        verify_shards(out, manifest)
    except ShardError:
        return None
    return manifest


def verify_shards(shard_dir: str | os.PathLike, manifest: dict | None = None) -> dict:
    """Check every shard listed in the manifest exists and matches its sha256; return the manifest."""
    shard_dir = Path(shard_dir)
    if manifest is None:
        manifest = read_manifest(shard_dir)
    for rec in manifest["shards"]:
        path = shard_dir / rec["file"]
        if not path.is_file():
            raise ShardError(f"shard missing: {path} (listed in {shard_dir / MANIFEST})")
        actual = file_sha256(path)
        if actual != rec["sha256"]:
            raise ShardError(f"shard corrupt: {path} has sha256 {actual[:16]}..., manifest expects "
                             f"{rec['sha256'][:16]}...; rebuild the shards (megafire prep shards --force)")
    return manifest


def read_manifest(shard_dir: str | os.PathLike) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise MissingFileError(f"no shard manifest at {path}; build shards with `megafire prep shards`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


class ShardSet:
    """Random access to the documents of a shard directory (memory-mapped, opened lazily).

    Picklable without its memory maps, so DataLoader workers (fork or spawn) reopen the
    files themselves instead of receiving copies of the data.
    """

    def __init__(self, shard_dir: str | os.PathLike, verify: bool = True):
        self.shard_dir = Path(shard_dir)
        self.manifest = verify_shards(self.shard_dir) if verify else read_manifest(self.shard_dir)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.eos_id = int(self.manifest["tokenizer"]["eos_id"])
        recs = self.manifest["shards"]
        self.doc_lengths = np.array([n for r in recs for n in r["doc_num_tokens"]], dtype=np.int64)
        self.doc_ids = [i for r in recs for i in r["doc_ids"]]
        self._doc_shard = np.array([s for s, r in enumerate(recs) for _ in r["doc_num_tokens"]], dtype=np.int64)
        self._doc_offset = np.array([o for r in recs for o in r["doc_offsets"]], dtype=np.int64)
        # Identifies the exact token content: stored in loader state to refuse resuming on other data.
        self.fingerprint = hashlib.sha256("".join(r["sha256"] for r in recs).encode()).hexdigest()
        self._maps: dict[int, np.ndarray] = {}

    @property
    def num_docs(self) -> int:
        return len(self.doc_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_lengths.sum())

    def doc(self, index: int) -> np.ndarray:
        """Token ids of document ``index`` (read-only view into the shard file)."""
        s = int(self._doc_shard[index])
        raw = self._maps.get(s)
        if raw is None:
            raw = np.memmap(self.shard_dir / self.manifest["shards"][s]["file"], dtype=np.uint8, mode="r")
            self._maps[s] = raw
        start = int(self._doc_offset[index])
        return raw[start:start + int(self.doc_lengths[index]) * self.dtype.itemsize].view(self.dtype)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state
