"""FIRE's MLP as exact piecewise-linear tables, and the MLP gradients from the kernels'
segment moments: one single-program Triton launch each.

A one-hidden-layer FIRE MLP ``f_h(x) = b2_h + sum_u W2[h, u] relu(w1_u x + b1_u)`` is
piecewise linear in ``x`` with a kink at ``k_u = -b1_u / w1_u`` per unit (``+inf`` for
``w1_u = 0``: that unit is the constant ``relu(b1_u)``). With the kinks sorted, ``rank_u``
= the position of unit ``u`` (ties broken by index), and the ``W + 1`` segments between
them, on segment ``s`` (kinks of rank ``< s`` lie below ``x``):

    f_h(x) = A[h, s] x + D[h, s],
    A[h, s] = A0_h + sum_{u: rank_u < s} W2[h, u] |w1_u|,
    D[h, s] = D0_h + sum_{u: rank_u < s} W2[h, u] b1_u sign(w1_u),
    A0_h = sum_u W2[h, u] w1_u [w1_u < 0],
    D0_h = b2_h + sum_u W2[h, u] (b1_u [w1_u < 0] + relu(b1_u) [w1_u = 0]),

(at ``x`` below every kink exactly the units with ``w1 < 0`` are on; crossing kink ``u``
turns ``u`` on (``w1 > 0``) or off (``w1 < 0``): the slope changes by ``W2 |w1|``). So
``f = A[s_lo] x + D[s_lo] + sum_t dA[t] relu(x - kink_t)`` over the kinks ``t >= s_lo``,
``dA[h, rank_u] = W2[h, u] |w1_u|``, exactly.

Gradients. The kernels reduce, per head, ``Pb[s]``/``Qb[s]`` (sums of ``dS`` / ``dS x`` of
the tiles whose smallest ``x`` lies on segment ``s``) and, per kink ``t`` crossing a tile,
``G[t]``/``GQ[t]`` (the sums over its scores with ``x > kink_t``). The sums over the scores
with ``x`` above kink ``t`` are then ``Pab[t] = sum_{s > t} Pb[s] + G[t]`` (same for Q), and
unit ``u`` is on above its kink (``w1 > 0``), below it (``w1 < 0``; ``Ptot - Pab``), or
everywhere / nowhere (``w1 = 0``: ``Ptot [b1 > 0]``). With ``Pk``/``Qk`` the sums of ``dS`` /
``dS x`` over the scores where unit ``u`` is on:

    dL/dW2[h, u] = w1_u Qk[h, u] + b1_u Pk[h, u],  dL/db2_h = Ptot_h,
    dL/dw1_u = sum_h W2[h, u] Qk[h, u],            dL/db1_u = sum_h W2[h, u] Pk[h, u].

Both kernels read the weights in their own dtype (fp32 or bf16 parameters, no casts) and
compute in fp32. They replace ~40 small PyTorch ops each (per layer, forward and backward)
that made a FIRE training step host-bound.
"""
from __future__ import annotations

import torch
import triton
from torch.library import wrap_triton
import triton.language as tl


@triton.jit
def _fire_prep_kernel(W1, B1, W2, B2, FT, IT, RANK, H, W, NS, NBINS,
                      WP: tl.constexpr, NSP: tl.constexpr, BLK: tl.constexpr):
    """FT = [A log2e (H x NS) | D log2e (H x NS) | dA log2e (H x W, by rank) | sorted kinks (W)],
    IT = [SEGLO (NBINS) | SEGHI (NBINS)], RANK (W). One program."""
    u = tl.arange(0, WP)
    mu = u < W
    w1 = tl.load(W1 + u, mask=mu, other=0.0).to(tl.float32)
    b1 = tl.load(B1 + u, mask=mu, other=0.0).to(tl.float32)
    nz = w1 != 0.0
    kink = tl.where(nz & mu, tl.math.div_rn(-b1, tl.where(nz, w1, 1.0)), float("inf"))
    # rank_u = #{v: kink_v < kink_u, or equal with v < u} (a stable sort), real units only
    kv = kink[None, :]
    ku = kink[:, None]
    before = ((kv < ku) | ((kv == ku) & (u[None, :] < u[:, None]))) & mu[None, :]
    rank = tl.sum(before.to(tl.int32), 1)                                   # [WP]
    tl.store(RANK + u, rank, mask=mu)
    tl.store(FT + 2 * H * NS + H * W + rank, kink, mask=mu)
    neg = (w1 < 0.0).to(tl.float32)
    zero = (w1 == 0.0).to(tl.float32)
    sgn = tl.where(w1 > 0.0, 1.0, tl.where(w1 < 0.0, -1.0, 0.0))
    s = tl.arange(0, NSP)
    below = rank[None, :] < s[:, None]                                     # [NSP, WP]: unit u's kink below segment s
    for h in range(H):
        w2 = tl.load(W2 + h * W + u, mask=mu, other=0.0).to(tl.float32)
        b2 = tl.load(B2 + h).to(tl.float32)
        da = w2 * tl.abs(w1)
        dd = w2 * b1 * sgn
        a0 = tl.sum(w2 * w1 * neg, 0)
        d0 = b2 + tl.sum(w2 * (b1 * neg + tl.maximum(b1, 0.0) * zero), 0)
        a = a0 + tl.sum(tl.where(below, da[None, :], 0.0), 1)               # [NSP]
        d = d0 + tl.sum(tl.where(below, dd[None, :], 0.0), 1)
        ms = s < NS
        tl.store(FT + h * NS + s, a * 1.4426950408889634, mask=ms)
        tl.store(FT + H * NS + h * NS + s, d * 1.4426950408889634, mask=ms)
        tl.store(FT + 2 * H * NS + h * W + rank, da * 1.4426950408889634, mask=mu)
    # SEGLO[g] = #kinks < g / NBINS; SEGHI[g] = #kinks <= (g + 1) / NBINS, the last one
    # #kinks <= 1 + 1e-4: x <= 1 for every score (up to lg2.approx's error), so kinks above
    # are never crossed and must not make the tiles near x = 1 look kinked
    for g0 in range(0, NBINS, BLK):
        g = g0 + tl.arange(0, BLK)
        mg = g < NBINS
        lo = tl.math.div_rn(g.to(tl.float32), NBINS * 1.0)
        hi = tl.math.div_rn((g + 1).to(tl.float32), NBINS * 1.0)
        hi = tl.where(g == NBINS - 1, 1.0001, hi)
        seglo = tl.sum(((kv < lo[:, None]) & mu[None, :]).to(tl.int32), 1)
        seghi = tl.sum(((kv <= hi[:, None]) & mu[None, :]).to(tl.int32), 1)
        tl.store(IT + g, seglo, mask=mg)
        tl.store(IT + NBINS + g, seghi, mask=mg)


@triton.jit
def _fire_grad_kernel(TOT, W1, B1, W2, RANK, DW1, DB1, DW2, DB2, H, W, NS,
                      WP: tl.constexpr, NSP: tl.constexpr):
    """TOT [H, 2 NS + 2 W] = [Pb | Qb | G | GQ] -> dw1, db1 (W), dW2 (H x W), db2 (H). One program."""
    u = tl.arange(0, WP)
    mu = u < W
    w1 = tl.load(W1 + u, mask=mu, other=0.0).to(tl.float32)
    b1 = tl.load(B1 + u, mask=mu, other=0.0).to(tl.float32)
    rank = tl.load(RANK + u, mask=mu, other=0)
    s = tl.arange(0, NSP)
    above = (s[None, :] > rank[:, None]) & (s[None, :] < NS)                # [WP, NSP]: segment s above kink u
    on0 = ((w1 == 0.0) & (b1 > 0.0)).to(tl.float32)
    dw1 = tl.zeros([WP], tl.float32)
    db1 = tl.zeros([WP], tl.float32)
    stride = 2 * NS + 2 * W
    for h in range(H):
        row = TOT + h * stride
        pb = tl.load(row + s, mask=s < NS, other=0.0)
        qb = tl.load(row + NS + s, mask=s < NS, other=0.0)
        g = tl.load(row + 2 * NS + rank, mask=mu, other=0.0)
        gq = tl.load(row + 2 * NS + W + rank, mask=mu, other=0.0)
        ptot = tl.sum(pb, 0)
        qtot = tl.sum(qb, 0)
        pab = tl.sum(tl.where(above, pb[None, :], 0.0), 1) + g              # [WP]
        qab = tl.sum(tl.where(above, qb[None, :], 0.0), 1) + gq
        pk = tl.where(w1 > 0.0, pab, tl.where(w1 < 0.0, ptot - pab, ptot * on0))
        qk = tl.where(w1 > 0.0, qab, tl.where(w1 < 0.0, qtot - qab, qtot * on0))
        w2 = tl.load(W2 + h * W + u, mask=mu, other=0.0).to(tl.float32)
        tl.store(DW2 + h * W + u, w1 * qk + b1 * pk, mask=mu)
        dw1 += w2 * qk
        db1 += w2 * pk
        tl.store(DB2 + h, ptot)
    tl.store(DW1 + u, dw1, mask=mu)
    tl.store(DB1 + u, db1, mask=mu)


def fire_tables(w1: torch.Tensor, b1: torch.Tensor, W2: torch.Tensor, b2: torch.Tensor, nbins: int):
    """(ft, it, rank) of the MLP (w1, b1 [W], W2 [H, W], b2 [H], any float dtype; layout in
    ``_fire_prep_kernel``), as float32 / int32 / int32 tensors on the weights' device."""
    H, W = W2.shape
    NS = W + 1
    dev = W2.device
    ft = torch.empty(2 * H * NS + H * W + W, device=dev, dtype=torch.float32)
    it = torch.empty(2 * nbins, device=dev, dtype=torch.int32)
    rank = torch.empty(W, device=dev, dtype=torch.int32)
    WP, NSP = triton.next_power_of_2(W), triton.next_power_of_2(NS)
    blk = max(16, min(256, 8192 // WP))
    wrap_triton(_fire_prep_kernel)[(1,)](w1, b1, W2, b2, ft, it, rank, H, W, NS, nbins, WP=WP, NSP=NSP, BLK=blk, num_warps=4)
    return ft, it, rank


def fire_mlp_grads(tot: torch.Tensor, w1, b1, W2, rank):
    """(dw1, db1, dW2, db2) in float32 from the per-head segment moments ``tot`` [H, 2 NS + 2 W]."""
    H, W = W2.shape
    dev = tot.device
    dw1 = torch.empty(W, device=dev, dtype=torch.float32)
    db1 = torch.empty(W, device=dev, dtype=torch.float32)
    dW2 = torch.empty(H, W, device=dev, dtype=torch.float32)
    db2 = torch.empty(H, device=dev, dtype=torch.float32)
    WP, NSP = triton.next_power_of_2(W), triton.next_power_of_2(W + 1)
    wrap_triton(_fire_grad_kernel)[(1,)](tot.contiguous(), w1, b1, W2, rank, dw1, db1, dW2, db2, H, W, W + 1,
                                         WP=WP, NSP=NSP, num_warps=4)
    return dw1, db1, dW2, db2

