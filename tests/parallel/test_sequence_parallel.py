"""Sequence parallelism (parallel.sequence_parallel, TP=2): loss and gradients equal TP=2 without
SP and TP=1, and the trainer's loss trace equals TP=2's -- on CPU (gloo) and on two GPUs (NCCL).

fp32 throughout: SP only moves where the sums over the TP group happen (a reduce-scatter then
a gather instead of an all-reduce; RMSNorm weight gradients summed over sequence shards), so
the results agree to a few ulps; a missing reduction is off by O(1).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel_testlib import clean_env, failure_report, run_job

TOL = 1e-5


def _check(record: dict) -> None:
    for name, r in record["grads"].items():
        print(name, json.dumps(r))
    assert set(record["grads"]) == {"fire", "rope", "fire-bias-docs"}
    for name, r in record["grads"].items():
        l1, l2, l3 = r["loss"]
        assert abs(l3 - l2) <= TOL * abs(l2) and abs(l3 - l1) <= TOL * abs(l1), (name, r["loss"])
        assert r["hooked"][1] > r["hooked"][0], f"{name}: the RMSNorm weights are not flagged TP-replicated under SP"
        for key in ("max_rel_grad_sp_vs_tp2", "max_rel_grad_sp_vs_tp1", "max_rel_norm_grad_sp_vs_tp1"):
            assert r[key] <= TOL, (name, key, r[key])
    tp2, sp = record["train"]["tp2"], record["train"]["tp2-sp"]
    assert len(tp2) == len(sp) == 4 and all(math.isfinite(x) for x in sp)
    worst = max(abs(a - b) / abs(b) for a, b in zip(sp, tp2))
    print(f"trainer: TP=2 {tp2}\n         TP=2+SP {sp}\n         max relative difference {worst:.2e}")
    assert worst <= TOL, (sp, tp2)


@pytest.mark.distributed
def test_sequence_parallel_cpu(tmp_path):
    proc = run_job("_sp_job.py", 2, str(tmp_path), "gloo", timeout=900)
    assert proc.returncode == 0, failure_report(proc)
    _check(json.loads((tmp_path / "sp.json").read_text()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_sequence_parallel_two_gpus(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).parent / "_sp_job.py"), str(tmp_path), "nccl"]
    env = clean_env(OMP_NUM_THREADS="1")
    env["DS_ACCELERATOR"] = "cuda"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, failure_report(proc)
    _check(json.loads((tmp_path / "sp.json").read_text()))


def test_sequence_parallel_layout_errors(tmp_path):
    from megafire.config import ConfigError
    from megafire.parallel import check_layout
    from parallel_testlib import tiny
    assert check_layout(tiny(tmp_path, "fire", {"tp": 2, "sequence_parallel": True}), 2) == 1
    for parallel, world, needle in [({"sequence_parallel": True}, 1, "needs parallel.tp > 1"),
                                    ({"tp": 2, "pp": 2, "zero_stage": 1, "sequence_parallel": True}, 4, "pp=2"),
                                    ({"tp": 2, "sequence_parallel": True, "zero_stage": 1}, 2, "data.seq_len=15")]:
        odd = parallel.get("zero_stage") == 1
        cfg = tiny(tmp_path, "fire", parallel, **(dict(sections={"data": {"seq_len": 15}}, tokens_per_step=60,
                                                         micro_batch_tokens=30) if odd else {}))
        with pytest.raises(ConfigError) as err:
            check_layout(cfg, world)
        assert needle in str(err.value), str(err.value)
