"""Checkpoints in every 2-rank layout: resume is bit-exact; the universal format consolidates
TP / PP / ZeRO-3 checkpoints into the TP=1 model and shards it back."""
from __future__ import annotations

import pytest
import torch

from parallel_testlib import failure_report, LAYOUTS_2, losses, run_job, tiny


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    proc = run_job("_resume_job.py", 2, str(out), ",".join(LAYOUTS_2), timeout=900)
    assert proc.returncode == 0, failure_report(proc)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS_2))
def test_resume_is_bit_exact(runs, layout):
    from megafire.train.universal import consolidated_state_dict
    full, cut = losses(runs / f"{layout}-full"), losses(runs / f"{layout}-cut")
    assert len(full) == 4 and cut == full, f"{layout}: resumed {cut} vs uninterrupted {full}"
    _, a = consolidated_state_dict(runs / f"{layout}-full")
    _, b = consolidated_state_dict(runs / f"{layout}-cut")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{layout}: {k} differs after resume"


@pytest.mark.distributed
def test_universal_roundtrip_and_conversion(runs, tmp_path):
    from megafire.model import GPT
    from megafire.parallel import init_parallel
    from megafire.train.universal import (consolidated_state_dict, load_into, save_universal, shard_state_dict)
    cfg, tp2 = consolidated_state_dict(runs / "tp2-full")
    # the universal directory reads back exactly
    univ = save_universal(runs / "tp2-full", tmp_path / "univ")
    cfg_u, again = consolidated_state_dict(univ)
    assert cfg_u.model == cfg.model and all(torch.equal(again[k], v) for k, v in tp2.items())
    # sharding the consolidated dict gives back each rank's file exactly (ZeRO-0: module weights)
    ds = sorted((runs / "tp2-full" / "checkpoints").glob("step_*"))[-1] / "ds"
    for rank in range(2):
        raw = torch.load(ds / f"mp_rank_{rank:02d}_model_states.pt", weights_only=False)["module"]
        shard = shard_state_dict(tp2, cfg, rank, 2)
        for k, v in shard.items():
            assert torch.equal(raw["model." + k].float(), v), f"rank {rank}: {k}"
    # TP=2 -> TP=1 and PP=2 -> TP=1 models compute the same logits (they trained the same)
    ctx = init_parallel(1, 1)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(16)
    logits = {}
    for name in ("tp2", "pp2", "dp2-z3"):
        c, state = consolidated_state_dict(runs / f"{name}-full")
        model = GPT.from_config(c, ctx).eval()
        load_into(model, state, c)
        with torch.no_grad():
            logits[name] = model(x, pos)
    torch.testing.assert_close(logits["tp2"], logits["pp2"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits["tp2"], logits["dp2-z3"], rtol=1e-4, atol=1e-4)


@pytest.mark.distributed
def test_init_from_other_layout(runs, tmp_path):
    """TP=2 weights continue training in a single-process run (fresh optimizer)."""
    from megafire.train.loop import train
    from megafire.train.universal import init_from_factory
    res = train(tiny(tmp_path / "cont", "fire", max_steps=1), model_factory=init_from_factory(runs / "tp2-full"))
    fresh = losses(runs / "tp2-full")
    assert res.final_loss < fresh[0], (res.final_loss, fresh)


@pytest.mark.distributed
def test_export_from_sharded_layouts(runs, tmp_path, monkeypatch):
    """Export reads TP=2, PP=2 and ZeRO-3 checkpoints through the universal format: transformers'
    logits of each export equal the consolidated single-process model's."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    from transformers import AutoModelForCausalLM

    from megafire.export import export_checkpoint
    from megafire.model import GPT
    from megafire.parallel import init_parallel
    from megafire.train.universal import consolidated_state_dict, load_into
    ctx = init_parallel(1, 1)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    for name in ("tp2", "pp2", "dp2-z3"):
        cfg, state = consolidated_state_dict(runs / f"{name}-full")
        model = GPT.from_config(cfg, ctx).eval()
        load_into(model, state, cfg)
        out = export_checkpoint(runs / f"{name}-full", tmp_path / name)
        hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            ours = model.gather_logits(model(x, torch.arange(16)))
            theirs = hf(input_ids=x).logits
        rel = ((theirs - ours).abs().max() / ours.abs().max()).item()
        assert rel <= 1e-4, f"{name}: export logits differ from the consolidated model by {rel:.2e}"
