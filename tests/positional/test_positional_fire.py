"""FIRE against a literal float64 implementation, its properties, and the ALiBi / Kerple-log
constructions it represents exactly."""
import itertools
import math

import numpy as np
import pytest
import torch

from megafire.positional import build_encoding


def literal_fire(enc, q_pos, k_pos):
    """b[h, a, c] = f_h(psi(i-j) / (psi(max(L, i)) + eps)), explicit loops, float64."""
    c = abs(float(enc.c_raw.detach()))
    L = abs(float(enc.L_mult.detach())) * enc.init_L if enc.use_threshold else 0.0
    psi = (lambda x: math.log(c * x + 1.0)) if enc.use_log else (lambda x: float(x))
    layers = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
              for m in enc.mlp if isinstance(m, torch.nn.Linear)]
    out = np.zeros((enc.num_heads_local, len(q_pos), len(k_pos)))
    for a, i in enumerate(q_pos):
        for b, j in enumerate(k_pos):
            d = max(i - j, 0)
            x = psi(d) / (psi(max(L, i)) + enc.eps) if enc.progressive else psi(d)
            h = np.array([x])
            for n, (w, bias) in enumerate(layers):
                h = w @ h + bias
                if n < len(layers) - 1:
                    h = np.maximum(h, 0.0)
            out[:, a, b] = h
    return torch.from_numpy(out)


def make_fire(**options):
    torch.manual_seed(0)
    enc = build_encoding("fire", num_heads=4, head_dim=8, init_L=16.0, **options)
    with torch.no_grad():  # move off the init values; the negative raws check the |.|
        enc.c_raw.fill_(-0.3)
        enc.L_mult.fill_(-1.25)  # L = 20
    return enc


ABLATIONS = [dict(zip(("use_log", "use_threshold", "progressive"), flags))
             for flags in itertools.product([True, False], repeat=3)]


@pytest.mark.parametrize("flags", ABLATIONS, ids=lambda f: "-".join(k for k, v in f.items() if not v) or "default")
def test_equals_literal(flags):
    enc = make_fire(**flags)
    q_pos, k_pos = list(range(0, 48, 3)) + [47], list(range(48))  # rows below and above L = 20
    b = enc.bias(torch.tensor(q_pos), torch.tensor(k_pos))
    assert b.dtype == torch.float32 and b.shape == (4, len(q_pos), 48) and torch.isfinite(b).all()
    torch.testing.assert_close(b.double(), literal_fire(enc, q_pos, k_pos), rtol=1e-5, atol=1e-5)


def test_depth_two_equals_literal():
    enc = make_fire(depth=2, width=8)
    assert len(enc.mlp) == 5
    q_pos, k_pos = [0, 5, 19, 20, 21, 39], list(range(40))
    b = enc.bias(torch.tensor(q_pos), torch.tensor(k_pos))
    torch.testing.assert_close(b.double(), literal_fire(enc, q_pos, k_pos), rtol=1e-5, atol=1e-5)


def test_defaults_and_attributes():
    enc = build_encoding("fire", num_heads=4, head_dim=8)
    assert (enc.width, enc.depth, enc.eps) == (32, 1, 1e-6)
    assert enc.use_log and enc.use_threshold and enc.progressive and not enc.shared_across_layers
    assert float(enc.c.detach()) == pytest.approx(0.1) and float(enc.L.detach()) == 512.0
    assert enc.log_values() == pytest.approx({"c": 0.1, "L": 512.0})
    assert [type(m).__name__ for m in enc.mlp] == ["Linear", "ReLU", "Linear"]
    assert enc.mlp[0].in_features == 1 and enc.mlp[2].out_features == 4
    assert build_encoding("fire", num_heads=4, head_dim=8, shared=True).shared_across_layers
    assert not build_encoding("fire", num_heads=4, head_dim=8, learn_L=False).L_mult.requires_grad
    assert float(build_encoding("fire", num_heads=4, head_dim=8, use_threshold=False).L) == 0.0


def test_batched_positions_equal_per_row():
    enc = make_fire()
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3], [30, 31, 32, 33, 34, 35, 36, 37]])
    b = enc.bias(pos, pos)
    assert b.shape == (2, 4, 8, 8)
    for n in range(2):
        torch.testing.assert_close(b[n], enc.bias(pos[n], pos[n]))


def test_mlp_inputs_lie_in_unit_interval():
    gen = torch.Generator().manual_seed(1)
    for trial in range(40):
        flags = ABLATIONS[trial % 8]
        if not flags["progressive"]:
            continue
        enc = build_encoding("fire", num_heads=2, head_dim=8, init_L=float(torch.randint(1, 200, (1,), generator=gen)),
                             **flags)
        with torch.no_grad():
            enc.c_raw.fill_(float(torch.empty(()).uniform_(-3, 3, generator=gen)))
        pos = torch.sort(torch.randint(0, 5000, (3, 50), generator=gen), dim=-1).values  # [B, T] increasing
        x = enc.mlp_input(pos, pos)
        causal = pos[:, :, None] >= pos[:, None, :]
        assert (x[causal] >= 0).all() and (x[causal] <= 1 + 1e-6).all(), (trial, x[causal].max())


def test_rows_below_L_are_toeplitz():
    enc = make_fire()  # L = 20
    pos = torch.arange(20)
    b = enc.bias(pos, pos)
    torch.testing.assert_close(b[:, 1:, 1:], b[:, :-1, :-1], rtol=0, atol=1e-6)
    # same distances at shifted positions, all rows still below L: same bias
    torch.testing.assert_close(enc.bias(pos[:12] + 7, pos[:12] + 7), b[:, :12, :12], rtol=0, atol=1e-6)
    # and above L the normalizer moves: not Toeplitz (the property is not vacuous)
    above = enc.bias(torch.arange(20, 60), torch.arange(20, 60))
    assert (above[:, 1:, 1:] - above[:, :-1, :-1]).abs().max() > 1e-4


def test_tp_flags():
    enc = build_encoding("fire", num_heads=4, head_dim=8, depth=2, tp_size=2, tp_rank=1)
    flagged = {n for n, p in enc.named_parameters() if getattr(p, "megafire_tp_replicated", False)}
    assert flagged == {"c_raw", "L_mult", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
    assert enc.mlp[-1].out_features == 2


# --- FIRE represents ALiBi and Kerple-log exactly -----------------------------------------
def set_linear_f(enc, head_weights, scale=1.0):
    """f_h(x) = w_h * scale * x on x >= 0: one hidden unit relu(x), output weights w_h."""
    with torch.no_grad():
        for p in enc.mlp.parameters():
            p.zero_()
        enc.mlp[0].weight[0, 0] = 1.0
        enc.mlp[2].weight[:, 0] = torch.as_tensor(head_weights) * scale


L_REPR = 128.0


def test_fire_represents_alibi():
    alibi = build_encoding("alibi", num_heads=12, head_dim=8)
    fire = build_encoding("fire", num_heads=12, head_dim=8, init_L=L_REPR, use_log=False, progressive=False)
    set_linear_f(fire, -alibi.slopes)
    pos = torch.arange(int(4 * L_REPR) + 1)  # every distance up to 4 L
    torch.testing.assert_close(fire.bias(pos, pos), alibi.bias(pos, pos), rtol=0, atol=1e-4)


@pytest.mark.parametrize("progressive", [False, True])
def test_fire_represents_kerple_log_with_shared_r2(progressive):
    torch.manual_seed(0)
    kerple = build_encoding("kerple_log", num_heads=8, head_dim=8)
    kerple.set_values(torch.linspace(0.2, 2.0, 8), 0.37)  # per-head r1, one r2
    r2 = float(kerple.r2[0].detach())
    n = int(4 * L_REPR)
    # progressive=False: f(psi(d)) with c = r2. progressive=True: put L above every query
    # position, so the normalizer is the constant psi(L) + eps and f's slope absorbs it.
    init_L = L_REPR if not progressive else 10.0 * n
    fire = build_encoding("fire", num_heads=8, head_dim=8, init_c=r2, init_L=init_L, progressive=progressive)
    scale = 1.0 if not progressive else math.log1p(r2 * init_L) + fire.eps
    set_linear_f(fire, -kerple.r1.detach(), scale)
    pos = torch.arange(n + 1)
    torch.testing.assert_close(fire.bias(pos, pos), kerple.bias(pos, pos), rtol=0, atol=1e-4)
