"""ALiBi slopes against Press et al.'s rule (written independently here) and literal values."""
import math

import pytest
import torch

from megafire.positional import build_encoding

# The paper's slopes, written out: H = 8 is 1/2 .. 1/256; H = 12 adds the 1st, 3rd, 5th and
# 7th slopes of the H = 16 set, 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
LITERAL = {
    8: [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625],
    12: [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625,
         0.7071067811865476, 0.3535533905932738, 0.1767766952966369, 0.08838834764831845],
}


def press_rule(num_heads):
    """Closest lower power of two p: m_k = 2^(-8k/p), k = 1..p; then the odd-numbered slopes of
    the 2p set, 2^(-8(2k-1)/(2p)), for the remaining heads."""
    p = 1
    while p * 2 <= num_heads:
        p *= 2
    slopes = [2.0 ** (-8.0 * k / p) for k in range(1, p + 1)]
    slopes += [2.0 ** (-4.0 * (2 * k - 1) / p) for k in range(1, num_heads - p + 1)]
    return slopes


@pytest.mark.parametrize("num_heads", [8, 16, 6, 12, 20])
def test_slopes_follow_press_rule(num_heads):
    enc = build_encoding("alibi", num_heads=num_heads, head_dim=8)
    assert enc.slopes.dtype == torch.float32 and enc.slopes.shape == (num_heads,)
    torch.testing.assert_close(enc.slopes, torch.tensor(press_rule(num_heads), dtype=torch.float32),
                               rtol=0, atol=0)


@pytest.mark.parametrize("num_heads", [8, 12])
def test_slopes_literal(num_heads):
    enc = build_encoding("alibi", num_heads=num_heads, head_dim=8)
    assert enc.slopes.tolist() == pytest.approx(LITERAL[num_heads], rel=1e-7)


def test_power_of_two_is_geometric():
    for h in (1, 2, 4, 32):
        enc = build_encoding("alibi", num_heads=h, head_dim=8)
        expect = [2 ** (-8 * (k + 1) / h) for k in range(h)]
        assert enc.slopes.tolist() == pytest.approx(expect, rel=1e-7)


def test_bias_literal_and_masked_finite():
    enc = build_encoding("alibi", num_heads=6, head_dim=8)
    q_pos, k_pos = torch.tensor([3, 4, 5, 9]), torch.arange(10)
    b = enc.bias(q_pos, k_pos)
    assert b.shape == (6, 4, 10) and b.dtype == torch.float32 and torch.isfinite(b).all()
    slopes = press_rule(6)
    for h in range(6):
        for a, i in enumerate(q_pos.tolist()):
            for j in range(10):
                if j <= i:
                    assert b[h, a, j].item() == pytest.approx(-slopes[h] * (i - j), rel=1e-6, abs=1e-7)


def test_slopes_stay_fp32_after_cast():
    enc = build_encoding("alibi", num_heads=12, head_dim=8).bfloat16()
    assert enc.slopes.dtype == torch.float32
    assert enc.slopes[8].item() == pytest.approx(math.sqrt(0.5), rel=1e-7)
