"""Kerple log / power against their formulas; constraints survive large-lr SGD."""
import math

import pytest
import torch

from megafire.positional import build_encoding


def literal(kind, r1, r2, q_pos, k_pos):
    out = torch.zeros(len(r1), len(q_pos), len(k_pos), dtype=torch.float64)
    for h in range(len(r1)):
        for a, i in enumerate(q_pos):
            for c, j in enumerate(k_pos):
                d = max(i - j, 0)
                out[h, a, c] = -r1[h] * (math.log(1 + r2[h] * d) if kind == "log" else d ** r2[h])
    return out


@pytest.mark.parametrize("kind", ["log", "power"])
def test_formula(kind):
    torch.manual_seed(0)
    enc = build_encoding(f"kerple_{kind}", num_heads=3, head_dim=8)
    enc.set_values(torch.tensor([0.3, 1.0, 1.7]), torch.tensor([0.2, 0.9, 1.8]))
    r1, r2 = enc.r1.tolist(), enc.r2.tolist()
    assert r1 == pytest.approx([0.3, 1.0, 1.7], rel=1e-5) and r2 == pytest.approx([0.2, 0.9, 1.8], rel=1e-5)
    q_pos, k_pos = [0, 1, 5, 17, 40], list(range(41))
    b = enc.bias(torch.tensor(q_pos), torch.tensor(k_pos))
    assert b.dtype == torch.float32 and b.shape == (3, 5, 41) and torch.isfinite(b).all()
    torch.testing.assert_close(b.double(), literal(kind, r1, r2, q_pos, k_pos), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["log", "power"])
def test_init_is_random_positive_and_reproducible(kind):
    torch.manual_seed(3)
    a = build_encoding(f"kerple_{kind}", num_heads=8, head_dim=8)
    torch.manual_seed(3)
    b = build_encoding(f"kerple_{kind}", num_heads=8, head_dim=8)
    assert torch.equal(a.r1, b.r1) and torch.equal(a.r2, b.r2)
    assert len(set(a.r1.tolist())) == 8 and (a.r1 > 0).all() and (a.r2 > 0).all()


@pytest.mark.parametrize("kind", ["log", "power"])
@pytest.mark.parametrize("direction", [-1.0, 1.0])
def test_constraints_hold_after_large_lr_sgd(kind, direction):
    torch.manual_seed(0)
    enc = build_encoding(f"kerple_{kind}", num_heads=4, head_dim=8)
    opt = torch.optim.SGD(enc.parameters(), lr=10.0)
    pos = torch.arange(64)
    for _ in range(30):
        opt.zero_grad()
        # direction -1 drives r1, r2 down towards (and past) 0, +1 drives them up (r2 past 2)
        loss = -direction * (enc.r1.sum() + enc.r2.sum()) + 1e-3 * enc.bias(pos, pos).sum()
        loss.backward()
        opt.step()
    r1, r2 = enc.r1, enc.r2
    assert (r1 > 0).all() and (r2 > 0).all(), (r1, r2)
    if kind == "power":
        assert (r2 <= 2.0).all(), r2
        if direction > 0:
            assert r2.max() > 1.99  # the push really reached the bound
    b = enc.bias(pos, pos)
    assert torch.isfinite(b).all()
    assert (b <= 0).all()  # a positive r1 keeps every causal bias a penalty
