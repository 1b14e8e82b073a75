"""Deterministic, resumable packed-sequence loader over tokenized shards.

The token stream
    Epoch ``e`` orders all documents by a permutation drawn from ``(seed, e)`` and
    concatenates them, each followed by one EOS: ``L = num_tokens + num_docs`` tokens.
    That epoch stream is cut into ``num_streams`` contiguous, equal (+-1 token) *streams*;
    stream ``k`` of epoch ``e + 1`` follows stream ``k`` of epoch ``e``, so every stream is
    infinite and nothing is ever dropped: no epoch-end remainder, no ragged last batch,
    and every rank always gets the same number of samples (multi-rank training cannot hang
    at an epoch boundary). A step's samples come from different streams, i.e. from far-apart
    regions of the shuffled epoch, so one batch mixes documents.

Samples
    Global sample ``c`` is read from stream ``c % num_streams`` at that stream's current
    offset: ``seq_len + 1`` tokens (inputs ``[:-1]``, labels ``[1:]``); the stream then
    advances by ``seq_len``, so the last label of a sample is the first input of the next
    sample from that stream and every token is an input exactly once. A global step takes
    ``dp_world_size * micro_batch_size`` consecutive samples; rank ``r`` gets those with
    ``j % dp_world_size == r``. The position is two numbers per stream, so ``seq_len`` and
    ``micro_batch_size`` may change between calls (curriculum stages) with the stream
    continuing exactly, and the state is independent of the rank (saved once, valid for
    any data-parallel size).

Positions and segments
    ``segment_ids`` number the documents inside a sample (0, 1, ...; an EOS belongs to the
    document it ends). ``reset_positions=False``: positions ``0..T-1``. ``True``: positions
    restart at 0 at each document start inside the sample; a sample that begins mid-document
    starts at 0 too (the model sees only the sample, and positions far beyond the training
    length would defeat length-generalization training). Where a stream wraps from one epoch
    to the next inside a sample (once per stream per epoch), a new segment starts as well,
    since the text jumps to another document.

Workers
    Each batch is a pure function of (state at the stage start, step number), so DataLoader
    worker ``w`` of ``n`` computes steps ``w, w+n, ...`` and the DataLoader's in-order
    round-robin returns them in step order: the output does not depend on the worker count.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import ShardSet

STATE_VERSION = 1


class TokenStreams:
    """The infinite per-stream token sequences of a shard set; pure and cheap to copy to workers."""

    def __init__(self, shards: ShardSet, seed: int, num_streams: int):
        self.shards, self.seed = shards, int(seed)
        self.epoch_len = shards.num_tokens + shards.num_docs  # +1 EOS per document
        if self.epoch_len == 0:
            raise ValueError(f"no tokens in {shards.shard_dir}")
        self.num_streams = max(1, min(int(num_streams), self.epoch_len))
        n = self.num_streams
        self.stream_start = np.array([self.epoch_len * k // n for k in range(n + 1)], dtype=np.int64)
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative start offsets [num_docs + 1]) of one epoch, LRU-cached."""
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.shards.num_docs)
            starts = np.zeros(len(order) + 1, dtype=np.int64)
            np.cumsum(self.shards.doc_lengths[order] + 1, out=starts[1:])
            self._epochs[epoch] = (order, starts)
            while len(self._epochs) > 4:  # streams straddle at most two epochs at a time
                self._epochs.popitem(last=False)
        self._epochs.move_to_end(epoch)
        return self._epochs[epoch]

    def _epoch_slice(self, epoch: int, start: int, n: int, tokens: np.ndarray, new_seg: np.ndarray) -> None:
        """Fill ``tokens``/``new_seg`` [n] from offset ``start`` of one epoch stream."""
        order, starts = self._epoch(epoch)
        i = int(np.searchsorted(starts, start, side="right")) - 1
        within, filled = start - int(starts[i]), 0
        while filled < n:
            doc = self.shards.doc(int(order[i]))
            take = min(n - filled, len(doc) + 1 - within)
            body = doc[within:within + take]
            tokens[filled:filled + len(body)] = body
            if len(body) < take:  # the piece reaches this document's EOS
                tokens[filled + len(body)] = self.shards.eos_id
            if within == 0:
                new_seg[filled] = True
            filled += take
            i, within = i + 1, 0

    def read(self, stream: int, offset: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` tokens of ``stream`` from ``offset`` and a flag per token: does a segment start here."""
        tokens = np.empty(n, dtype=np.int64)
        new_seg = np.zeros(n, dtype=bool)
        lo, hi = int(self.stream_start[stream]), int(self.stream_start[stream + 1])
        length, filled = hi - lo, 0
        while filled < n:
            epoch, within = divmod(offset + filled, length)
            take = min(n - filled, length - within)
            self._epoch_slice(epoch, lo + within, take, tokens[filled:filled + take], new_seg[filled:filled + take])
            if filled > 0:  # wrapped into the next epoch: the text jumps to another document
                new_seg[filled] = True
            filled += take
        return tokens, new_seg


def _visits(num_samples: np.ndarray | int, stream: np.ndarray | int, num_streams: int):
    """How many of the global samples ``0..num_samples-1`` fall on ``stream``."""
    return np.maximum(0, (np.asarray(num_samples) - stream + num_streams - 1) // num_streams)


def build_batch(streams: TokenStreams, samples0: int, offsets0: np.ndarray, step: int, seq_len: int,
                micro_batch_size: int, dp_rank: int, dp_world_size: int, reset_positions: bool) -> dict:
    """Batch of ``dp_rank`` for ``step`` steps after the state (samples0, offsets0); numpy arrays."""
    T, B, W, N = seq_len, micro_batch_size, dp_world_size, streams.num_streams
    tokens = np.empty((B, T + 1), dtype=np.int64)
    new_seg = np.empty((B, T + 1), dtype=bool)
    for b in range(B):
        c = samples0 + step * W * B + b * W + dp_rank   # global sample index
        k = c % N
        earlier = int(_visits(c, k, N) - _visits(samples0, k, N))  # samples of stream k this stage
        tokens[b], new_seg[b] = streams.read(k, int(offsets0[k]) + earlier * T, T + 1)
    starts = new_seg[:, :T].copy()
    starts[:, 0] = True
    # A token opens a segment where a document starts; the EOS stays with the document it ends.
    segment_ids = np.cumsum(starts, axis=1) - 1                           # [B, T]
    if reset_positions:
        idx = np.broadcast_to(np.arange(T), (B, T))
        last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
        positions = idx - last_start                                      # [B, T]
    else:
        positions = np.broadcast_to(np.arange(T), (B, T)).copy()
    return {"input_ids": tokens[:, :T], "labels": tokens[:, 1:], "positions": positions,
            "segment_ids": segment_ids.astype(np.int32)}


def _to_torch(batch: dict) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


class _StageSteps(IterableDataset):
    """Steps ``first, first+1, ...`` of one (seq_len, micro_batch) stage, split across workers."""

    def __init__(self, streams, samples0, offsets0, first_step, shape, dp_rank, dp_world_size, reset_positions):
        super().__init__()
        self.streams, self.samples0, self.offsets0 = streams, samples0, offsets0
        self.first_step, self.shape = first_step, shape
        self.dp_rank, self.dp_world_size, self.reset_positions = dp_rank, dp_world_size, reset_positions

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        step = self.first_step + worker
        while True:
            yield _to_torch(build_batch(self.streams, self.samples0, self.offsets0, step, *self.shape,
                                        self.dp_rank, self.dp_world_size, self.reset_positions))
            step += num_workers


class PackedLoader:
    """Per-rank iterator of packed batches; ``state_dict()`` is its exact position.

    Usage::

        loader = PackedLoader("shards/train", seq_len=128, micro_batch_size=8,
                              dp_rank=rank, dp_world_size=world, seed=1234)
        batch = next(loader)            # input_ids/labels/positions [B, T] int64, segment_ids int32
        loader.set_shape(256, 4)        # curriculum: the stream continues where it stopped
        state = loader.state_dict()     # same on every rank; load_state_dict(state) resumes exactly

    ``num_workers > 0`` computes batches in DataLoader worker processes (prefetching);
    the batches are identical to ``num_workers=0``.
    """

    def __init__(self, shard_dir: str | os.PathLike, seq_len: int, micro_batch_size: int, *,
                 dp_rank: int = 0, dp_world_size: int = 1, seed: int = 0, reset_positions: bool = False,
                 num_workers: int = 0, num_streams: int = 64, prefetch_factor: int = 4, verify: bool = True,
                 pin_memory: bool = False):
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_world_size={dp_world_size})")
        self.shards = ShardSet(shard_dir, verify=verify)
        self.streams = TokenStreams(self.shards, seed, num_streams)
        self.dp_rank, self.dp_world_size = int(dp_rank), int(dp_world_size)
        self.reset_positions = bool(reset_positions)
        self.num_workers, self.prefetch_factor, self.pin_memory = int(num_workers), prefetch_factor, pin_memory
        self.samples_consumed = 0
        self.offsets = np.zeros(self.streams.num_streams, dtype=np.int64)
        self.tokens_consumed = 0   # global input tokens, all ranks (for token-based schedules)
        self._iter = None
        self.set_shape(seq_len, micro_batch_size)

    @property
    def eos_id(self) -> int:
        return self.shards.eos_id

    @property
    def epoch(self) -> float:
        """Epochs of the token stream consumed so far (fractional)."""
        return self.tokens_consumed / self.streams.epoch_len

    def set_shape(self, seq_len: int, micro_batch_size: int) -> None:
        """Change the sample length and micro-batch size from the next batch on."""
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be >= 1, got {seq_len}, {micro_batch_size}")
        shape = (int(seq_len), int(micro_batch_size))
        if getattr(self, "shape", None) != shape:
            self.shape = shape
            self._restart()

    @property
    def seq_len(self) -> int:
        return self.shape[0]

    @property
    def micro_batch_size(self) -> int:
        return self.shape[1]

    def _restart(self) -> None:
        """Drop prefetched work; the next batch is computed from the consumed position."""
        self._iter = None
        self._stage = (self.samples_consumed, self.offsets.copy())
        self._stage_step = 0

    def _batches(self) -> Iterator[dict]:
        samples0, offsets0 = self._stage
        steps = _StageSteps(self.streams, samples0, offsets0, self._stage_step, self.shape,
                            self.dp_rank, self.dp_world_size, self.reset_positions)
        if self.num_workers == 0:
            return iter(steps)
        return iter(DataLoader(steps, batch_size=None, num_workers=self.num_workers,
                               prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
                               multiprocessing_context="spawn" if torch.cuda.is_initialized() else None))

    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._iter = self._batches()
        batch = next(self._iter)
        self._advance()
        return batch

    def _advance(self) -> None:
        """Account for one consumed global step (all ranks' samples)."""
        T, B = self.shape
        N = self.streams.num_streams
        before = self.samples_consumed
        after = before + self.dp_world_size * B
        k = np.arange(N)
        self.offsets += T * (_visits(after, k, N) - _visits(before, k, N))
        self.samples_consumed = after
        self.tokens_consumed += self.dp_world_size * B * T
        self._stage_step += 1

    def state_dict(self) -> dict:
        """Small, JSON-serializable, identical on every data-parallel rank."""
        return {"version": STATE_VERSION, "seed": self.streams.seed, "num_streams": self.streams.num_streams,
                "data_fingerprint": self.shards.fingerprint, "samples_consumed": int(self.samples_consumed),
                "tokens_consumed": int(self.tokens_consumed), "stream_offsets": [int(x) for x in self.offsets]}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Resume at ``state``; ``strict`` refuses a state saved on other data, seed or stream count."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("seed", "num_streams", "data_fingerprint"):
            if strict and state[key] != mine[key]:
                raise ValueError(f"loader state was saved with {key}={state[key]!r}, this loader has "
                                 f"{mine[key]!r}; pass strict=False to resume anyway")
        if len(state["stream_offsets"]) != self.streams.num_streams:
            raise ValueError("loader state has a different number of streams")
        self.samples_consumed = int(state["samples_consumed"])
        self.tokens_consumed = int(state["tokens_consumed"])
        self.offsets = np.array(state["stream_offsets"], dtype=np.int64)
        self._restart()


def read_documents(shard_dir: str | os.PathLike, verify: bool = True) -> list[np.ndarray]:
    """All documents of a shard directory as token arrays (e.g. the held-out split for eval)."""
    shards = ShardSet(shard_dir, verify=verify)
    return [np.asarray(shards.doc(i)) for i in range(shards.num_docs)]


def long_document_windows(docs_tokens: Sequence[np.ndarray], length: int, *, eos_id: int | None = None,
                          min_doc_tokens: int | None = None, max_windows: int | None = None) -> dict:
    """One evaluation window per document, starting at the document's first token.

    With ``eos_id`` the input is ``[EOS] + doc[:length-1]`` and the labels ``doc[:length]``
    (as in training, where a document follows an EOS; every label is a document token).
    Without it the input is ``doc[:length]`` and the labels ``doc[1:length+1]``. Documents
    too short for the window, or shorter than ``min_doc_tokens`` (pass the longest eval
    length to score the same documents at every length), are skipped.
    Returns ``input_ids``, ``labels``, ``positions`` [N, length] int64 and ``doc_index`` [N].
    """
    need = length if eos_id is not None else length + 1
    need = max(need, min_doc_tokens or 0)
    rows, labels, kept = [], [], []
    for i, doc in enumerate(docs_tokens):
        doc = np.asarray(doc, dtype=np.int64)
        if len(doc) < need:
            continue
        if eos_id is not None:
            rows.append(np.concatenate([[eos_id], doc[:length - 1]]))
            labels.append(doc[:length])
        else:
            rows.append(doc[:length])
            labels.append(doc[1:length + 1])
        kept.append(i)
        if max_windows is not None and len(kept) >= max_windows:
            break
    n = len(kept)

    def as_tensor(xs):  # [n, length]; an empty batch keeps its shape
        return torch.from_numpy(np.stack(xs)) if xs else torch.zeros(0, length, dtype=torch.int64)

    return {"input_ids": as_tensor(rows), "labels": as_tensor(labels),
            "positions": torch.arange(length).expand(n, length).clone(),
            "doc_index": torch.tensor(kept, dtype=torch.int64)}
