"""NoPE, learned absolute and sinusoidal encodings."""
import math

import pytest
import torch

from megafire.positional import build_encoding


def test_nope_contributes_nothing():
    enc = build_encoding("nope", num_heads=4, head_dim=8)
    assert enc.kind == "none" and not list(enc.parameters()) and enc.flops(100, 10) == 0
    with pytest.raises(NotImplementedError):
        enc.bias(torch.arange(3), torch.arange(3))


def test_learned_adds_table_rows():
    torch.manual_seed(0)
    enc = build_encoding("learned", num_heads=4, head_dim=8, max_positions=16)
    assert enc.hidden_size == 32 and enc.embedding.weight.shape == (16, 32)
    assert build_encoding("learned", num_heads=4, head_dim=8, hidden_size=48).embedding.weight.shape[1] == 48
    x = torch.randn(2, 5, 32)
    pos = torch.tensor([[0, 1, 2, 3, 4], [9, 10, 0, 1, 15]])
    out = enc.embed(x, pos)
    for b in range(2):
        for t in range(5):
            torch.testing.assert_close(out[b, t], x[b, t] + enc.embedding.weight[pos[b, t]])
    assert enc.embed(x.bfloat16(), pos[0]).dtype == torch.bfloat16


def test_learned_rejects_positions_beyond_table():
    enc = build_encoding("learned", num_heads=4, head_dim=8, max_positions=16)
    with pytest.raises(ValueError, match="max_positions=16"):
        enc.embed(torch.zeros(1, 3, 32), torch.tensor([14, 15, 16]))


def test_sinusoidal_equals_vaswani():
    enc = build_encoding("sinusoidal", num_heads=2, head_dim=4)  # hidden 8
    x = torch.zeros(1, 4, 8)
    pos = torch.tensor([0, 1, 7, 1000])
    out = enc.embed(x, pos)
    for t, p in enumerate(pos.tolist()):
        for k in range(4):
            angle = p / 10000 ** (2 * k / 8)
            assert out[0, t, 2 * k].item() == pytest.approx(math.sin(angle), abs=2e-5)
            assert out[0, t, 2 * k + 1].item() == pytest.approx(math.cos(angle), abs=2e-5)
    with pytest.raises(ValueError, match="even"):
        build_encoding("sinusoidal", num_heads=1, head_dim=3)
