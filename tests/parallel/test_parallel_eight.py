"""Issue 7's CPU rehearsal: 8 gloo processes form the groups of every 8-GPU layout correctly
and train a tiny model for 2 steps in each (launch/eight_gpu.sh --dry-run). Slow: 8 processes
start 4 x 2 times on a 2-core machine (~10 min)."""
from __future__ import annotations

import subprocess

import pytest

from parallel_testlib import REPO


@pytest.mark.slow
@pytest.mark.distributed
def test_eight_way_dry_run(tmp_path):
    proc = subprocess.run([str(REPO / "launch" / "eight_gpu.sh"), "--dry-run", "--steps", "2", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=3000, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert out.count("groups OK") == 4, out[-5000:]
    table = (tmp_path / "comparison.md").read_text()
    for layout in ("z1", "z3", "tp2pp2", "tp4"):
        assert f"{tmp_path}/{layout}" in table
    # the universal format consolidates every 8-way checkpoint into the same TP=1 model
    import torch

    from megafire.model import GPT
    from megafire.parallel import init_parallel
    from megafire.train.universal import consolidated_state_dict, load_into
    ctx = init_parallel(1, 1)
    x, pos = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1)), torch.arange(32)
    logits = {}
    for layout in ("z1", "z3", "tp2pp2", "tp4"):
        cfg, state = consolidated_state_dict(tmp_path / layout)
        model = GPT.from_config(cfg, ctx).eval()
        load_into(model, state, cfg)
        with torch.no_grad():
            logits[layout] = model(x, pos)
        torch.testing.assert_close(logits[layout], logits["z1"], rtol=1e-4, atol=1e-5)
