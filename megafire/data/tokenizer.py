"""SentencePiece tokenizer: lossless training settings, a small wrapper, vocabulary checks.

Lossless means ``decode(encode(x)) == x`` for any string: SentencePiece's default NFKC
normalization turns tabs and newlines into spaces and merges runs of spaces, so we train
with the ``identity`` rule, keep whitespace as is, add no dummy prefix, and fall back to
UTF-8 bytes for characters outside the vocabulary. Special ids are fixed: unk 0, bos 1,
eos 2, pad 3 (pad is never produced by ``encode``; the loader does not pad, but a model
or an eval batch may need a filler id).

``train_tokenizer`` is idempotent: it writes ``tokenizer.model`` and ``tokenizer.json`` (the
request that produced it) and does nothing when the request is unchanged.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from megafire.config import ConfigError, MissingFileError

from .corpus import Document, corpus_info, file_sha256, load_corpus

MODEL_FILE = "tokenizer.model"
INFO_FILE = "tokenizer.json"
MODEL_TYPES = ("bpe", "unigram")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# SentencePiece caps each training "sentence"; paragraphs longer than this are cut into pieces.
_MAX_SENTENCE_CHARS = 8192


class Tokenizer:
    """Thin wrapper over a SentencePiece model file; ``checksum`` identifies it in manifests/checkpoints."""

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise MissingFileError(f"tokenizer model {path} does not exist (data.tokenizer_dir / --tokenizer: "
                                   f"a tokenizer.model or its directory; build one with `megafire prep tokenizer`)")
        self.path = path
        self.checksum = file_sha256(path)
        self._sp = spm.SentencePieceProcessor(model_file=str(path))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no bos/eos added (the loader inserts the EOS separators)."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, sha256={self.checksum[:12]})"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    return Tokenizer(path)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, *, allow_padding: bool = False) -> None:
    """Raise ``ValueError`` unless the model's vocabulary fits the tokenizer.

    Exact equality by default. ``allow_padding=True`` accepts a larger model vocabulary
    (Megatron pads the embedding to a multiple of 128 x TP for even sharding).
    """
    n_tok = tokenizer.vocab_size
    ok = model_vocab_size >= n_tok if allow_padding else model_vocab_size == n_tok
    if not ok:
        rule = "at least" if allow_padding else "exactly"
        raise ConfigError(
            f"vocabulary mismatch: the model has vocab_size={model_vocab_size} but the tokenizer "
            f"{tokenizer.path} (sha256 {tokenizer.checksum[:12]}) has {n_tok} pieces; the model "
            f"needs {rule} {n_tok} (set model.vocab_size={n_tok} or retrain the tokenizer)")


def _training_sentences(docs: Iterable[Document]) -> Iterator[str]:
    """Paragraphs with their newlines kept, so newline runs become learnable pieces."""
    for doc in docs:
        text = doc.text
        start = 0
        while start < len(text):
            cut = text.find("\n\n", start)
            end = len(text) if cut < 0 else cut + 2
            end = min(end, start + _MAX_SENTENCE_CHARS)
            yield text[start:end]
            start = end


def _request(corpus, vocab_size: int, model_type: str, split: str, extra: dict) -> dict:
    """Everything that determines the trained model; equal requests give the same model."""
    if isinstance(corpus, (str, os.PathLike)):
        source = corpus_info(corpus, split)
    else:  # in-memory documents: fingerprint their content
        h = hashlib.sha256()
        for d in corpus:
            h.update(d.id.encode() + b"\0" + d.text.encode() + b"\0")
        source = {"path": None, "sha256": h.hexdigest(), "split": "in-memory"}
    return {"format": 1, "vocab_size": vocab_size, "model_type": model_type, "corpus": source,
            "sentencepiece": spm.__version__, **extra}


def train_tokenizer(corpus: str | os.PathLike | Sequence[Document], out_dir: str | os.PathLike,
                    vocab_size: int, model_type: str = "bpe", *, split: str = "train",
                    character_coverage: float = 0.9995, num_threads: int | None = None,
                    input_sentence_size: int = 2_000_000, seed_sentencepiece_size: int = 1_000_000,
                    force: bool = False) -> Path:
    """Train a lossless SentencePiece model on ``corpus`` (path, ``"default"`` or documents).

    Returns the path of ``out_dir/tokenizer.model``. Skips training when ``tokenizer.json``
    records the same request (same corpus checksum and options) and the model file exists.
    ``split`` picks the corpus side for path inputs: train on the training documents only,
    so evaluation text does not shape the vocabulary.
    """
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if vocab_size < 256 + 4 + 1:  # byte fallback needs all 256 bytes plus the 4 specials
        raise ConfigError(f"vocab_size={vocab_size} is too small: byte fallback needs more than 260 pieces")
    out = Path(out_dir)
    model_path, info_path = out / MODEL_FILE, out / INFO_FILE
    request = _request(corpus, vocab_size, model_type, split,
                       {"character_coverage": character_coverage, "input_sentence_size": input_sentence_size})
    if not force and model_path.is_file() and info_path.is_file():
        previous = json.loads(info_path.read_text())
        if previous.get("request") == request and previous.get("sha256") == file_sha256(model_path):
            return model_path
    docs = load_corpus(corpus, split) if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    if not docs:
        raise ConfigError("cannot train a tokenizer on an empty corpus")
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_sentences(docs), model_writer=proto,
        vocab_size=vocab_size, model_type=model_type,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        byte_fallback=True, allow_whitespace_only_pieces=True, split_digits=True,
        character_coverage=character_coverage, max_sentence_length=4 * _MAX_SENTENCE_CHARS,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
        seed_sentencepiece_size=seed_sentencepiece_size,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        num_threads=num_threads or min(8, os.cpu_count() or 1), minloglevel=2)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(model_path, proto.getvalue())
    info = {"request": request, "sha256": file_sha256(model_path), "vocab_size": vocab_size,
            "special_ids": {"unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID, "pad": PAD_ID}}
    _atomic_write(info_path, (json.dumps(info, indent=1) + "\n").encode())
    return model_path


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
