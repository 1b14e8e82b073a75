"""Packed loader: coverage across ranks and workers, resume, curriculum, positions/segments, windows.

The synthetic shards hold documents whose token ids are all distinct, so every token's
origin (document, offset) is known and duplicates or gaps are visible.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megafire.data.loader import PackedLoader, long_document_windows, read_documents

EOS = 2


def epoch_lengths(num_docs: int, epoch_len: int, seed: int = 0) -> list[int]:
    """Random document lengths (one much longer than a sample) with ``epoch_len`` stream tokens."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(1, 60, size=num_docs).astype(float)
    raw[rng.integers(num_docs)] += 150
    target = epoch_len - num_docs  # each document adds one EOS
    lengths = np.maximum(1, np.floor(raw / raw.sum() * target)).astype(int)
    lengths[np.argmax(lengths)] += target - lengths.sum()
    return lengths.tolist()


def take(loader, steps):
    return [next(loader) for _ in range(steps)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("epochs", [1, 2])
def test_ranks_and_workers_cover_stream_exactly(make_shards, epochs):
    # 8 streams x 5 samples x 16 tokens = one epoch of 640 tokens; 2 ranks x B=2 -> 10 steps/epoch.
    shard_dir, docs = make_shards(epoch_lengths(23, 640))
    loaders = [PackedLoader(shard_dir, 16, 2, dp_rank=r, dp_world_size=2, seed=7, num_streams=8,
                            num_workers=2) for r in range(2)]
    per_rank = [take(ld, 10 * epochs) for ld in loaders]
    assert [len(b) for b in per_rank] == [10 * epochs, 10 * epochs]
    inputs = torch.cat([b["input_ids"].flatten() for batches in per_rank for b in batches]).numpy()
    doc_tokens = np.concatenate([t for _, _, t in docs])
    values, counts = np.unique(inputs[inputs != EOS], return_counts=True)
    np.testing.assert_array_equal(values, np.sort(doc_tokens))        # nothing dropped
    assert (counts == epochs).all()                                   # nothing repeated
    assert (inputs == EOS).sum() == len(docs) * epochs               # one separator per document
    assert loaders[0].state_dict() == loaders[1].state_dict()        # rank-independent state
    assert loaders[0].epoch == pytest.approx(epochs)


def test_ranks_get_equal_counts_past_ragged_epoch_end(make_shards):
    shard_dir, _ = make_shards([37, 5, 90, 13, 61])   # 211 stream tokens: no shape divides it
    loaders = [PackedLoader(shard_dir, 7, 3, dp_rank=r, dp_world_size=2, num_streams=5) for r in range(2)]
    for _ in range(40):   # ~8 epochs
        shapes = [tuple(next(ld)["input_ids"].shape) for ld in loaders]
        assert shapes == [(3, 7), (3, 7)]


def test_worker_count_does_not_change_batches(make_shards):
    shard_dir, _ = make_shards(epoch_lengths(30, 1000))
    ref = take(PackedLoader(shard_dir, 12, 3, seed=1, num_workers=0), 9)
    assert_batches_equal(take(PackedLoader(shard_dir, 12, 3, seed=1, num_workers=2), 9), ref)


def test_resume_mid_epoch_equals_uninterrupted(make_shards):
    shard_dir, _ = make_shards(epoch_lengths(30, 1000))
    kwargs = dict(dp_rank=1, dp_world_size=2, seed=3, reset_positions=True)
    full = PackedLoader(shard_dir, 16, 2, **kwargs)
    first = take(full, 5)
    full.set_shape(32, 1)                 # a curriculum stage change before the checkpoint
    first += take(full, 3)
    state = full.state_dict()
    rest = take(full, 6)
    full.set_shape(8, 4)
    rest += take(full, 6)

    resumed = PackedLoader(shard_dir, 32, 1, num_workers=2, **kwargs)
    resumed.load_state_dict(state)
    got = take(resumed, 6)
    resumed.set_shape(8, 4)
    got += take(resumed, 6)
    assert_batches_equal(got, rest)
    assert resumed.state_dict() == full.state_dict()


def test_resume_refuses_other_seed(make_shards):
    shard_dir, _ = make_shards([50, 60])
    state = PackedLoader(shard_dir, 8, 1, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(shard_dir, 8, 1, seed=2).load_state_dict(state)


def test_changing_seq_len_continues_the_stream(make_shards):
    shard_dir, docs = make_shards(epoch_lengths(12, 500))
    loader = PackedLoader(shard_dir, 16, 1, num_streams=1, seed=5)
    pieces, prev = [], None
    for seq_len, batch_size, steps in [(16, 1, 3), (40, 2, 2), (7, 3, 4), (64, 1, 1)]:
        loader.set_shape(seq_len, batch_size)
        for batch in take(loader, steps):
            assert batch["input_ids"].shape == (batch_size, seq_len)
            for row_in, row_lab in zip(batch["input_ids"], batch["labels"]):
                torch.testing.assert_close(row_in[1:], row_lab[:-1])   # labels are inputs shifted
                if prev is not None:
                    assert row_in[0] == prev      # next sample starts at the previous last label
                prev = row_lab[-1]
                pieces.append(row_in)
    stream = torch.cat(pieces).numpy()
    # With one stream the samples tile the shuffled epoch: documents appear whole, in order.
    by_first = {int(t[0]): t for _, _, t in docs}
    i = 0
    while i < len(stream) and stream[i] in by_first:
        doc = by_first[int(stream[i])]
        n = min(len(doc), len(stream) - i)
        np.testing.assert_array_equal(stream[i:i + n], doc[:n])
        i += n
        if i < len(stream):
            assert stream[i] == EOS
            i += 1
    assert i == len(stream)
    assert loader.tokens_consumed == 3 * 16 + 2 * 80 + 4 * 21 + 64


def reference_segments(inputs: np.ndarray):
    """Segment ids and reset positions computed the slow way from the EOS tokens alone."""
    seg, pos, segments, positions = 0, 0, [], []
    for t, tok in enumerate(inputs):
        if t > 0 and inputs[t - 1] == EOS:
            seg, pos = seg + 1, 0
        segments.append(seg)
        positions.append(pos)
        pos += 1
    return np.array(segments), np.array(positions)


@pytest.mark.parametrize("reset", [True, False])
def test_positions_and_segments(make_shards, reset):
    shard_dir, docs = make_shards([5, 3, 4, 1, 9, 70, 2, 2, 6, 3, 7, 4, 8, 2])
    loader = PackedLoader(shard_dir, 24, 4, num_streams=1, reset_positions=reset, seed=2)
    seen_eos = seen_multi = 0
    for batch in take(loader, 1):        # 96 tokens < one epoch (140): no epoch wrap inside
        assert batch["segment_ids"].dtype == torch.int32
        for b in range(4):
            inputs = batch["input_ids"][b].numpy()
            seg, pos = reference_segments(inputs)
            np.testing.assert_array_equal(batch["segment_ids"][b].numpy(), seg)
            want = pos if reset else np.arange(24)
            np.testing.assert_array_equal(batch["positions"][b].numpy(), want)
            seen_eos += (inputs == EOS).sum()
            seen_multi += seg.max() > 0
    assert seen_eos >= 3 and seen_multi >= 2
    # Every EOS input follows the last token of a document.
    ends = {int(t[-1]) for _, _, t in docs}
    flat = batch["input_ids"].flatten().numpy()
    for i in np.flatnonzero(flat[1:] == EOS) + 1:
        if i % 24:   # within a sample
            assert flat[i - 1] in ends


def test_epoch_wrap_inside_sample_starts_a_segment(make_shards):
    # 53-token epoch in streams of 26 and 27 tokens; no set of documents (+EOS) sums to 26, so
    # stream 1 always begins mid-document and its wrap is not at a document start.
    shard_dir, _ = make_shards([10, 11, 12, 16])
    loader = PackedLoader(shard_dir, 20, 2, num_streams=2, reset_positions=True)
    next(loader)
    batch = next(loader)   # sample 2: stream 0 wraps after 6 tokens; sample 3: stream 1 after 7
    for b, wrap in [(0, 6), (1, 7)]:
        seg = batch["segment_ids"][b].numpy()
        pos = batch["positions"][b].numpy()
        assert pos[wrap] == 0 and seg[wrap] == seg[wrap - 1] + 1


def test_long_document_windows(make_shards):
    shard_dir, docs = make_shards([5, 50, 100, 33], num_shards=2)
    tokens = read_documents(shard_dir)
    for got, (_, _, want) in zip(tokens, docs):
        np.testing.assert_array_equal(got, want)
    w = long_document_windows(tokens, 32, eos_id=EOS)
    assert w["doc_index"].tolist() == [1, 2, 3]
    assert (w["input_ids"][:, 0] == EOS).all()
    for row, lab, d in zip(w["input_ids"], w["labels"], w["doc_index"]):
        np.testing.assert_array_equal(lab.numpy(), tokens[d][:32])        # starts at the document start
        np.testing.assert_array_equal(row[1:].numpy(), tokens[d][:31])
    assert w["positions"].shape == (3, 32) and (w["positions"][:, 0] == 0).all()
    assert long_document_windows(tokens, 32, min_doc_tokens=64)["doc_index"].tolist() == [2]
    plain = long_document_windows(tokens, 33)
    assert plain["doc_index"].tolist() == [1, 2]                        # needs length + 1 tokens
    np.testing.assert_array_equal(plain["labels"][0].numpy(), tokens[1][1:34])
