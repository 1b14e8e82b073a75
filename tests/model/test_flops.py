"""FLOP accounting against a hand count for one tiny config."""
from __future__ import annotations

import pytest
from model_testlib import tiny_config

from megafire.flops import FlopsPerToken, flops_per_token, mfu, model_flops_per_token
from megafire.model import GPT

# V=64, d=32, L=2, Hq=4, Hkv=2, D=8, F=ceil(8*32/3/64)*64=128, T=16, toy_bias flops = 4 * scores * H
HAND_MATMUL = 2 * (2 * (32 * 8 * 8 + 4 * 8 * 32 + 3 * 32 * 128) + 32 * 64)   # 65536
HAND_ATTENTION = 2 * 4 * 4 * 8 * (16 / 2)                                    # 2048: causal half
HAND_ENCODING = 2 * 4 * (16 * 16 / 2) * 4 / 16                               # 256: per layer, per token


@pytest.mark.parametrize("shared", [False, True])
def test_flops_match_hand_count(parallel, shared):
    cfg = tiny_config("toy_bias", {"shared": shared})
    model = GPT.from_config(cfg, parallel, seed=0)
    assert len(model.encodings) == (1 if shared else 2)
    f = model_flops_per_token(model, 16)
    assert f == FlopsPerToken(HAND_MATMUL, HAND_ATTENTION, HAND_ENCODING)
    assert f.forward == 65536 + 2048 + 256 and f.train == 3 * 67840
    assert flops_per_token(cfg.model, 16, causal=False).attention == 2 * HAND_ATTENTION


def test_matmul_flops_are_twice_the_matmul_parameters(parallel):
    model = GPT.from_config(tiny_config("nope"), parallel, seed=0)
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if "norm" not in n)   # tied head: E once
    assert flops_per_token(model.config, 16).matmul == 2 * matmul_params


def test_mfu():
    assert mfu(1000.0, 203520.0, 1e9) == pytest.approx(0.20352)
    assert mfu(1000.0, 203520.0, 1e9, num_devices=2) == pytest.approx(0.10176)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)
