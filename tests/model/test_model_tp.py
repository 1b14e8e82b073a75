"""Two gloo processes: TP=2 logits equal TP=1, and gradients (after the TP all-reduce of
replicated encoding parameters) equal the TP=1 gradients."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ENCODINGS_UNDER_TEST = ["toy_bias", "fire", "rope", "alibi", "t5", "kerple_log", "learned"]


def shard(full: torch.Tensor, name: str, rank: int, tp: int) -> torch.Tensor:
    """The slice of a TP=1 tensor that TP rank `rank` holds (megatron's partitioning)."""
    if name.endswith("gate_up.weight"):                                  # stride 2: [gate_r; up_r]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]])
    if name.endswith(("qkv.weight", "word.weight")):
        return full.chunk(tp, 0)[rank]
    if name.endswith("out.weight") or name.endswith("down.weight"):
        return full.chunk(tp, 1)[rank]
    return full


def _worker(rank: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    from model_testlib import tiny_config  # also registers "toy_bias" in this process

    from megafire.model import GPT, lm_loss
    from megafire.parallel import ParallelContext, allreduce_tp_replicated_grads, destroy_parallel, init_parallel
    from megafire.positional import encoding_class
    try:
        ctx2 = init_parallel(tp=2, backend="gloo")
        singles = [dist.new_group([r]) for r in range(2)]
        ctx1 = ParallelContext(tp_rank=0, tp_size=1, tp_group=singles[rank])
        for name in ENCODINGS_UNDER_TEST:
            try:
                encoding_class(name)
            except ImportError:
                continue
            cfg = tiny_config(name, {"init_L": 8.0} if name == "fire" else None, vocab_size=64)
            m1, m2 = GPT.from_config(cfg, ctx1, seed=7), GPT.from_config(cfg, ctx2, seed=7)
            torch.manual_seed(0)
            x, labels = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
            pos = torch.arange(12) + 3
            l1 = m1(x, pos)
            l2 = m2(x, pos)
            torch.testing.assert_close(m2.gather_logits(l2), l1, atol=1e-5, rtol=1e-5, msg=f"{name}: logits")
            torch.nn.functional.cross_entropy(l1.flatten(0, 1), labels.flatten()).backward()
            lm_loss(l2, labels).backward()
            allreduce_tp_replicated_grads(m2, ctx2.tp_group)
            p1 = dict(m1.named_parameters())
            for n, p in m2.named_parameters():
                full = p1[n].grad
                assert (p.grad is None) == (full is None), f"{name}: grad of {n} is None on one side only"
                if full is None:
                    continue
                if p.shape == full.shape:
                    expect = full
                elif "encoding" in n:                                 # per-head encoding parameters
                    expect = full.chunk(2, dim=_head_dim(full.shape, p.shape))[rank]
                else:
                    expect = shard(full, n, rank, 2)
                torch.testing.assert_close(p.grad, expect, atol=1e-5, rtol=1e-4, msg=f"{name}: grad of {n}")
    finally:
        destroy_parallel()


def _head_dim(full_shape, local_shape) -> int:
    return next(i for i, (a, b) in enumerate(zip(full_shape, local_shape)) if a != b)


@pytest.mark.distributed
def test_tp2_equals_tp1():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port,), nprocs=2, join=True)
