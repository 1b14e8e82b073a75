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


@pytest.mark.gpu
def test_kernel_time_excludes_host_gaps():
    """``--kernel-time``: a call that is one large matmul has kernel time close to its wall time;
    the same matmul behind 20 ms of host sleep keeps its kernel time while the wall time grows."""
    import time

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from megafire.bench.attention import kernel_ms
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def matmul():
        return a @ a

    def slow():
        time.sleep(0.02)
        return a @ a

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    matmul()
    start.record()
    for _ in range(10):
        matmul()
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end) / 10
    k_fast, k_slow = kernel_ms(matmul, 10), kernel_ms(slow, 10)
    assert 0.7 * wall < k_fast < 1.1 * wall, (k_fast, wall)
    assert abs(k_slow - k_fast) < 0.2 * k_fast and k_slow < 5.0, (k_slow, k_fast)   # not the 20 ms sleep


def _tiles(tmp_path, *extra):
    import json
    import os
    import subprocess
    import sys
    out = tmp_path / f"tiles{len(list(tmp_path.iterdir()))}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("MEGAFIRE_FUSED_KU", "MEGAFIRE_FUSED_CONFIGS")}
    done = subprocess.run([sys.executable, "-m", "megafire.cli", "bench", "tiles", "--encodings", "fire,t5",
                           "--seqlens", "512", "--ku", "1,2", "--segment-bounds", "0,1", "--json", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {(r["encoding"], r["ku"], r["segment_bounds"]): r for r in json.loads(out.read_text())}


def test_bench_tiles_general_loop_share(tmp_path):
    """``megafire bench tiles`` on the trainer's packed rows (two documents): the narrower
    per-segment tile bounds take tiles out of FIRE's general loop, more so with KU=2; T5's
    boundary-crossing share falls too. One document per row: segment bounds change nothing."""
    pytest.importorskip("triton")
    rows = _tiles(tmp_path)
    assert len({r["live_tiles"] for r in rows.values()}) == 1           # the same tiles in every variant
    fire = {k[1:]: r["heavy_share"] for k, r in rows.items() if k[0] == "fire"}
    assert fire[(2, True)] < fire[(1, True)] < fire[(1, False)] and fire[(2, True)] < fire[(2, False)]
    t5 = {k[1:]: r for k, r in rows.items() if k[0] == "t5"}
    assert t5[(1, True)]["crossing_share"] < t5[(1, False)]["crossing_share"]
    mono = _tiles(tmp_path, "--monotone")
    for (enc, ku, _sb), r in mono.items():
        other = mono[(enc, ku, not _sb)]
        assert (r["heavy_share"], r["crossing_share"]) == (other["heavy_share"], other["crossing_share"])
