"""``megafire bench attention --documents K``: the packed rows its fused variants and ``--tune``
time, checked against the trainer's contract (megafire/train/synthetic.py, the real loader):
positions count from 0 in each document, segment ids number the documents, every row has K."""
from __future__ import annotations

import pytest
import torch

from megafire.bench.attention import packed_positions


@pytest.mark.parametrize("documents", [2, 5])
def test_packed_positions_restart_per_document(documents):
    B, N = 3, 64
    pos, seg = packed_positions(B, N, documents, "cpu", seed=7)
    assert pos.shape == seg.shape == (B, N) and seg.dtype == torch.int32
    for b in range(B):
        s = seg[b].tolist()
        assert s[0] == 0 and sorted(set(s)) == list(range(documents)) and s == sorted(s)
        for t in range(N):   # literal rule: 0 at a document's first token, else previous + 1
            expect = 0 if t == 0 or s[t] != s[t - 1] else pos[b, t - 1].item() + 1
            assert pos[b, t].item() == expect
    again, _ = packed_positions(B, N, documents, "cpu", seed=7)
    assert torch.equal(pos, again)                         # seeded: every tuning candidate sees the same rows


def test_one_document_is_plain_positions_and_too_many_is_an_error():
    pos, seg = packed_positions(2, 16, 1, "cpu")
    assert seg is None and torch.equal(pos, torch.arange(16))
    with pytest.raises(ValueError, match="--documents 17 > sequence length 16"):
        packed_positions(2, 16, 17, "cpu")
