"""FIRE's piecewise-linear tables and MLP gradients (the single-program Triton kernels of
``megafire.attention.fused._fire_tables``) against literal PyTorch formulas.

The table reference is the flex backend's differentiable one, written independently of the
kernels' masked-sum formulation: it sorts the kinks with ``torch.sort`` and uses cumulative
sums, as the maths in the module docstring reads; the tables are also checked against the MLP
itself at sample points. The gradient reference goes further: it differentiates the MLP itself with
autograd on sampled x values whose segment moments are fed to the kernel.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megafire.attention.flex import fire_segment_tables
from megafire.attention.fused._fire_tables import fire_mlp_grads, fire_tables

LOG2E = 1.4426950408889634


def reference_tables(w1, b1, W2, b2, nbins):
    """(A, D [H, W + 1], dA [H, W] by rank, sorted kinks, SEGLO, SEGHI, sort order): the flex
    backend's sort + cumsum tables (an implementation independent of the kernel's masked sums),
    the bins by searchsorted."""
    A, D, ks, order = fire_segment_tables(w1, b1, W2, b2)
    dA = W2[:, order] * w1[order].abs()            # the slope step at each sorted kink
    edges = torch.arange(nbins + 1, dtype=torch.float32) / nbins
    seglo = torch.searchsorted(ks, edges[:-1], right=False)
    seghi = torch.searchsorted(ks, edges[1:], right=True)
    seghi[-1] = torch.searchsorted(ks, torch.tensor([1.0001]), right=True)[0]
    return A, D, dA, ks, seglo, seghi, order


def mlp(x, w1, b1, W2, b2):
    """f_h(x) for x [n] -> [n, H]."""
    return F.relu(x[:, None] * w1[None, :] + b1[None, :]) @ W2.t() + b2


def weights(W=7, H=3, seed=0, zero_unit=True, tie=True):
    g = torch.Generator().manual_seed(seed)
    w1, b1 = torch.randn(W, generator=g), torch.randn(W, generator=g) * 0.5
    W2, b2 = torch.randn(H, W, generator=g), torch.randn(H, generator=g)
    if zero_unit:                      # a unit with w1 = 0: constant relu(b1), kink +inf
        w1[1], b1[1] = 0.0, 0.3
    if tie:                            # two units with the same kink: the sort must be stable
        w1[4], b1[4] = 2 * w1[2], 2 * b1[2]
    return w1, b1, W2, b2


@pytest.mark.parametrize("W,H", [(7, 3), (32, 12), (5, 1)])
def test_tables_equal_sorted_cumsum_reference(W, H):
    w1, b1, W2, b2 = weights(W, H, seed=W + H, tie=W > 4)
    with torch.no_grad():
        w1[0], b1[0] = 1.0, -0.5       # a kink at exactly a bin edge (0.5 = 512 / 1024)
        w1[3], b1[3] = 1.0, -1.00005   # just above x = 1: counted by the last bin's SEGHI (<= 1 + 1e-4)
    nbins = 1024
    ft, it, rank = fire_tables(w1, b1, W2, b2, nbins)
    A, D, dA, ks, seglo, seghi, order = reference_tables(w1, b1, W2, b2, nbins)
    NS = W + 1
    torch.testing.assert_close(ft[:H * NS].view(H, NS), A * LOG2E, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ft[H * NS:2 * H * NS].view(H, NS), D * LOG2E, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ft[2 * H * NS:2 * H * NS + H * W].view(H, W), dA * LOG2E, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ft[2 * H * NS + H * W:], ks)
    assert torch.equal(order[rank.long()], torch.arange(W)), "rank is the inverse of the stable sort"
    assert torch.equal(it[:nbins].long(), seglo) and torch.equal(it[nbins:].long(), seghi)
    # the tables are the MLP: on every segment A x + D equals f at sample points
    x = torch.linspace(-0.5, 1.5, 997)
    s = torch.searchsorted(ks, x, right=True)                     # segment of x (kinks below it)
    f_tab = (ft[:H * NS].view(H, NS)[:, s] * x + ft[H * NS:2 * H * NS].view(H, NS)[:, s]).t() / LOG2E
    torch.testing.assert_close(f_tab, mlp(x, w1, b1, W2, b2), rtol=1e-5, atol=1e-5)


def test_tables_read_bf16_weights_without_casts():
    w1, b1, W2, b2 = (t.to(torch.bfloat16) for t in weights(tie=False))
    ft, it, rank = fire_tables(w1, b1, W2, b2, 1024)
    ref = fire_tables(*(t.float() for t in (w1, b1, W2, b2)), 1024)
    assert torch.equal(ft, ref[0]) and torch.equal(it, ref[1]) and torch.equal(rank, ref[2])


@pytest.mark.parametrize("W,H", [(7, 3), (32, 4)])
def test_mlp_grads_equal_autograd_of_the_mlp(W, H):
    """Scores at sampled x with upstream gradients dS: the kernel's segment moments (Pb, Qb per
    segment of the tile minimum, G, GQ per crossed kink) -> the same weight gradients as
    autograd through f on the scores."""
    w1, b1, W2, b2 = (t.double() for t in weights(W, H, seed=3))
    g = torch.Generator().manual_seed(4)
    n_tiles, per = 40, 25
    x = torch.rand(n_tiles, per, generator=g, dtype=torch.float64) * 1.4 - 0.2       # [tiles, scores]
    dS = torch.randn(n_tiles, per, H, generator=g, dtype=torch.float64)
    params = [t.clone().requires_grad_(True) for t in (w1, b1, W2, b2)]
    (mlp(x.reshape(-1), *params) * dS.reshape(-1, H)).sum().backward()
    want = [p.grad for p in params]

    ks = fire_segment_tables(w1, b1, W2, b2)[2]
    NS = W + 1
    tot = torch.zeros(H, 2 * NS + 2 * W, dtype=torch.float64)
    for t in range(n_tiles):                        # what the dq kernel reduces, tile by tile
        xt, ds = x[t], dS[t]                        # [per], [per, H]
        s_lo = int(torch.searchsorted(ks, xt.min(), right=True))
        tot[:, s_lo] += ds.sum(0)
        tot[:, NS + s_lo] += (ds * xt[:, None]).sum(0)
        for r in range(s_lo, W):                    # kinks at or above the tile's smallest x
            above = (xt > ks[r]).double()[:, None]
            tot[:, 2 * NS + r] += (ds * above).sum(0)
            tot[:, 2 * NS + W + r] += (ds * above * xt[:, None]).sum(0)
    _, _, rank = fire_tables(*(t.float() for t in (w1, b1, W2, b2)), 1024)
    got = fire_mlp_grads(tot.float(), w1.float(), b1.float(), W2.float(), rank)
    for name, gk, gw in zip(("w1", "b1", "W2", "b2"), got, want):
        torch.testing.assert_close(gk.double(), gw, rtol=2e-5, atol=2e-5 * gw.abs().max().item(), msg=name)
