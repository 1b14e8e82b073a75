"""Triton kernels: FlashAttention-2 style attention with an in-kernel position bias.

Scores (natural-log units) ``s_ij = scale * q_i . k_j + b_h(i, j)``; masked scores are
-inf; ``P = softmax(s)``; ``O = P V``. Internally the kernels work in base 2
(``s * log2(e)``) and save the base-2 log-sum-exp per row.

Backward (per score, recomputed): ``dP = dO V^T``, ``dS = P * (dP - delta)`` with
``delta_i = sum_d dO_id O_id``; ``dQ = scale dS K``, ``dK = scale dS^T Q``, ``dV = P^T dO``;
``dL/db_h(i, j) = dS_ij``, reduced in-kernel into the encoding's few parameters:

* ALiBi ``b = -m_h r`` (``r = max(qpos_i - kpos_j, 0)``): no gradient.
* Kerple-log ``b = -r1 log(1 + r2 r)``, Kerple-power ``b = -r1 r^r2``: two dS-weighted
  sums per head, accumulated elementwise in registers over the whole loop, reduced once.
* T5 ``b = W[h, lut[min(r, RT)]]``: the gradient of ``W[h, k]`` is the sum of dS over the
  scores in bucket k. Buckets are monotone in ``r``; each tile loops over the (few) buckets
  it spans, one masked tile-sum per bucket, one atomic add per (tile, bucket) into a
  per-program partial row (never shared between programs).
* FIRE ``b = F_h(x)``, ``x = psi(r) / (psi(max(L, qpos_i)) + eps)`` with ``F_h`` the
  piecewise-linear interpolant of the MLP on ``G + 1`` uniform nodes of ``[0, 1]``
  (cell ``g = floor(x G)``, ``w = x G - g``, ``F = F[g] + w (F[g+1] - F[g])``). The node
  gradients ``dF[g] += dS (1 - w)``, ``dF[g + 1] += dS w`` are reduced like T5's buckets
  (cells are monotone in ``j`` for a row; far tiles span one or two cells). ``c`` and ``L``
  get ``sum dS F'(x) dx/dc`` and ``sum dS F'(x) dx/dL``, accumulated elementwise and
  reduced once per program with per-row factors.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl


def _patch_interpreter() -> None:
    """Triton 3.6's interpreter turns 1-element arrays into loop bounds with ``int(arr)``,
    which NumPy >= 2.4 refuses for non-0-d arrays; take the single element instead."""
    try:
        from triton.runtime import interpreter as _it
    except ImportError:  # pragma: no cover
        return
    if getattr(_it, "_megafire_patched", False):
        return
    orig = _it._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _it._patch_lang_tensor = patched
    _it._megafire_patched = True


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _patch_interpreter()

# bias modes (constexpr)
NONE, ALIBI, KERPLE_LOG, KERPLE_POW, T5, FIRE = 0, 1, 2, 3, 4, 5

LOG2E = 1.4426950408889634


@triton.jit
def _bias(BIAS: tl.constexpr, h, qpos, kpos, P0, P1, TAB, LUT, SC, tab_stride, NT, RT, eps,
          USE_LOG: tl.constexpr, USE_THR: tl.constexpr):
    """qpos, kpos: int32 tensors broadcastable to the tile. Returns (bias, key, w, x, slope).

    key/w: table index and interpolation weight (T5, FIRE); x and slope = dF/dx (FIRE).
    Unused outputs are zeros and cost nothing once the compiler drops them.
    """
    r = tl.maximum(qpos - kpos, 0)
    rf = r.to(tl.float32)
    zero = rf * 0.0
    key = r * 0
    w = zero
    x = zero
    slope = zero
    if BIAS == 1:
        m = tl.load(P0 + h)
        b = -m * rf
    elif BIAS == 2:
        r1 = tl.load(P0 + h)
        r2 = tl.load(P1 + h)
        b = -r1 * tl.log(1.0 + r2 * rf)
    elif BIAS == 3:
        r1 = tl.load(P0 + h)
        r2 = tl.load(P1 + h)
        pw = tl.where(r > 0, tl.exp(r2 * tl.log(tl.maximum(rf, 1.0))), 0.0)
        b = -r1 * pw
    elif BIAS == 4:
        key = tl.load(LUT + tl.minimum(r, RT))
        b = tl.load(TAB + h * tab_stride + key)
    elif BIAS == 5:
        c = tl.load(SC)
        qf = qpos.to(tl.float32)
        if USE_THR:
            L = tl.load(SC + 1)
            ieff = tl.maximum(qf, L)
        else:
            ieff = qf
        if USE_LOG:
            psi_r = tl.log(1.0 + c * rf)
            den = tl.log(1.0 + c * ieff) + eps
        else:
            psi_r = rf
            den = ieff + eps
        x = psi_r / den
        t = tl.minimum(tl.maximum(x * NT, 0.0), NT * 1.0)
        g = tl.minimum(t.to(tl.int32), NT - 1)
        w = t - g.to(tl.float32)
        f0 = tl.load(TAB + h * tab_stride + g)
        f1 = tl.load(TAB + h * tab_stride + g + 1)
        b = f0 + w * (f1 - f0)
        slope = (f1 - f0) * NT
        key = g
    else:
        b = zero
    return b, key, w, x, slope


@triton.jit
def _mask(CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, offs_m, offs_n, qpos, kpos, sq, sk, Tq, Tk):
    valid = (offs_m < Tq) & (offs_n < Tk)
    if CAUSAL:
        valid = valid & (offs_n <= offs_m + (Tk - Tq)) & (kpos <= qpos)
    if HAS_SEG:
        valid = valid & (sq == sk)
    return valid


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, QP, KP, SQ, SK, P0, P1, TAB, LUT, SC,
                sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                qp_sb, kp_sb, sq_sb, sk_sb,
                H, GROUP, Tq, Tk, tab_stride, NT, RT, scale2, eps,
                BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
                USE_LOG: tl.constexpr, USE_THR: tl.constexpr, DOT_PREC: tl.constexpr,
                D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    mrow = offs_m < Tq
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=mrow[:, None], other=0.0)
    qpos = tl.load(QP + b * qp_sb + offs_m, mask=mrow, other=0)
    sq = offs_m * 0
    if HAS_SEG:
        sq = tl.load(SQ + b * sq_sb + offs_m, mask=mrow, other=-1)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (pid_m + 1) * BM + (Tk - Tq))
    kbase = K + b * skb + hk * skh
    vbase = V + b * svb + hk * svh
    for start_n in range(0, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        mcol = offs_n < Tk
        k = tl.load(kbase + offs_n[:, None] * skt + offs_d[None, :], mask=mcol[:, None], other=0.0)
        v = tl.load(vbase + offs_n[:, None] * svt + offs_d[None, :], mask=mcol[:, None], other=0.0)
        kpos = tl.load(KP + b * kp_sb + offs_n, mask=mcol, other=0)
        sk = offs_n * 0
        if HAS_SEG:
            sk = tl.load(SK + b * sk_sb + offs_n, mask=mcol, other=-2)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale2
        if BIAS != 0:
            bias, _k, _w, _x, _s = _bias(BIAS, h, qpos[:, None], kpos[None, :], P0, P1, TAB, LUT, SC,
                                         tab_stride, NT, RT, eps, USE_LOG, USE_THR)
            s += bias * 1.4426950408889634
        valid = _mask(CAUSAL, HAS_SEG, offs_m[:, None], offs_n[None, :], qpos[:, None], kpos[None, :],
                      sq[:, None], sk[None, :], Tq, Tk)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=mrow[:, None])
    tl.store(LSE + bh * Tq + offs_m, lse, mask=mrow)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, QP, KP, SQ, SK, P0, P1, TAB, LUT, SC,
                     sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
                     qp_sb, kp_sb, sq_sb, sk_sb,
                     H, HKV, GROUP, Tq, Tk, tab_stride, NT, RT, scale2, scale, eps,
                     BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
                     USE_LOG: tl.constexpr, USE_THR: tl.constexpr, DOT_PREC: tl.constexpr,
                     D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """One program per (key block, batch, kv head): dK, dV summed over the GQA group."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    mcol = offs_n < Tk
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=mcol[:, None], other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], mask=mcol[:, None], other=0.0)
    kpos = tl.load(KP + b * kp_sb + offs_n, mask=mcol, other=0)
    sk = offs_n * 0
    if HAS_SEG:
        sk = tl.load(SK + b * sk_sb + offs_n, mask=mcol, other=-2)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    lo = 0
    if CAUSAL:
        lo = tl.maximum(pid_n * BN - (Tk - Tq), 0)
        lo = (lo // BM) * BM
    for hh in range(0, GROUP):
        h = hk * GROUP + hh
        for start_m in range(lo, Tq, BM):
            offs_m = start_m + tl.arange(0, BM)
            mrow = offs_m < Tq
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=mrow[:, None], other=0.0)
            do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=mrow[:, None],
                         other=0.0)
            lse = tl.load(LSE + (b * H + h) * Tq + offs_m, mask=mrow, other=float("inf"))
            delta = tl.load(DELTA + (b * H + h) * Tq + offs_m, mask=mrow, other=0.0)
            qpos = tl.load(QP + b * qp_sb + offs_m, mask=mrow, other=0)
            sq = offs_m * 0
            if HAS_SEG:
                sq = tl.load(SQ + b * sq_sb + offs_m, mask=mrow, other=-1)
            sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale2  # [BN, BM]
            if BIAS != 0:
                bias, _k, _w, _x, _s = _bias(BIAS, h, qpos[None, :], kpos[:, None], P0, P1, TAB, LUT, SC,
                                             tab_stride, NT, RT, eps, USE_LOG, USE_THR)
                sT += bias * 1.4426950408889634
            valid = _mask(CAUSAL, HAS_SEG, offs_m[None, :], offs_n[:, None], qpos[None, :], kpos[:, None],
                          sq[None, :], sk[:, None], Tq, Tk)
            pT = tl.where(valid, tl.math.exp2(sT - lse[None, :]), 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    dk = dk * scale
    tl.store(DK + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=mcol[:, None])
    tl.store(DV + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=mcol[:, None])


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, QP, KP, SQ, SK, P0, P1, TAB, LUT, SC, PART,
                   sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
                   qp_sb, kp_sb, sq_sb, sk_sb,
                   H, GROUP, Tq, Tk, tab_stride, NT, RT, scale2, scale, eps, part_stride,
                   BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
                   USE_LOG: tl.constexpr, USE_THR: tl.constexpr, DOT_PREC: tl.constexpr, PGRAD: tl.constexpr,
                   D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """One program per (query block, batch, head): dQ and the bias-parameter partial sums.

    PART row of this program (fp32, zeroed by the caller): T5 ``[0, NT)`` bucket sums;
    FIRE ``[0, NT]`` node sums, ``[NT + 1]`` dc, ``[NT + 2]`` dL; Kerple ``[0]`` dr1, ``[1]`` dr2.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    mrow = offs_m < Tq
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=mrow[:, None], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=mrow[:, None], other=0.0)
    lse = tl.load(LSE + bh * Tq + offs_m, mask=mrow, other=float("inf"))
    delta = tl.load(DELTA + bh * Tq + offs_m, mask=mrow, other=0.0)
    qpos = tl.load(QP + b * qp_sb + offs_m, mask=mrow, other=0)
    sq = offs_m * 0
    if HAS_SEG:
        sq = tl.load(SQ + b * sq_sb + offs_m, mask=mrow, other=-1)
    part = PART + (bh * tl.num_programs(0) + pid_m) * part_stride
    dq = tl.zeros([BM, D], tl.float32)
    acc1 = tl.zeros([BM, BN], tl.float32)
    acc2 = tl.zeros([BM, BN], tl.float32)
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (pid_m + 1) * BM + (Tk - Tq))
    kbase = K + b * skb + hk * skh
    vbase = V + b * svb + hk * svh
    for start_n in range(0, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        mcol = offs_n < Tk
        k = tl.load(kbase + offs_n[:, None] * skt + offs_d[None, :], mask=mcol[:, None], other=0.0)
        v = tl.load(vbase + offs_n[:, None] * svt + offs_d[None, :], mask=mcol[:, None], other=0.0)
        kpos = tl.load(KP + b * kp_sb + offs_n, mask=mcol, other=0)
        sk = offs_n * 0
        if HAS_SEG:
            sk = tl.load(SK + b * sk_sb + offs_n, mask=mcol, other=-2)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale2
        bias, key, w, x, slope = _bias(BIAS, h, qpos[:, None], kpos[None, :], P0, P1, TAB, LUT, SC,
                                       tab_stride, NT, RT, eps, USE_LOG, USE_THR)
        if BIAS != 0:
            s += bias * 1.4426950408889634
        valid = _mask(CAUSAL, HAS_SEG, offs_m[:, None], offs_n[None, :], qpos[:, None], kpos[None, :],
                      sq[:, None], sk[None, :], Tq, Tk)
        p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        if PGRAD:
            if BIAS == 2:
                r1 = tl.load(P0 + h)
                r2 = tl.load(P1 + h)
                rf = tl.maximum(qpos[:, None] - kpos[None, :], 0).to(tl.float32)
                acc1 += ds * (bias / r1)
                acc2 += ds * (-r1 * rf / (1.0 + r2 * rf))
            elif BIAS == 3:
                r1 = tl.load(P0 + h)
                rf = tl.maximum(qpos[:, None] - kpos[None, :], 0).to(tl.float32)
                acc1 += ds * (bias / r1)
                acc2 += ds * (bias * tl.log(tl.maximum(rf, 1.0)))
            elif BIAS >= 4:
                kmin = tl.min(tl.where(valid, key, 2147483647))
                kmax = tl.max(tl.where(valid, key, -1))
                if BIAS == 5:
                    dhi = ds * w
                    dlo = ds - dhi
                    # c and L: dS * F'(x) * dx/d{c,L}; dx/dc = (dpsi_r/dc - x dden/dc) / den
                    u = ds * slope
                    if USE_LOG:
                        c = tl.load(SC)
                        rf = tl.maximum(qpos[:, None] - kpos[None, :], 0).to(tl.float32)
                        acc1 += u * (rf / (1.0 + c * rf))
                    acc2 += u * x
                else:
                    dlo = ds
                    dhi = ds
                s_ = kmin
                while s_ <= kmax:
                    sel = key == s_
                    tl.atomic_add(part + s_, tl.sum(tl.sum(tl.where(sel, dlo, 0.0), 1), 0))
                    if BIAS == 5:
                        tl.atomic_add(part + s_ + 1, tl.sum(tl.sum(tl.where(sel, dhi, 0.0), 1), 0))
                    s_ += 1
    dq = dq * scale
    tl.store(DQ + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=mrow[:, None])
    if PGRAD:
        if (BIAS == 2) | (BIAS == 3):
            tl.store(part, tl.sum(tl.sum(acc1, 1), 0))
            tl.store(part + 1, tl.sum(tl.sum(acc2, 1), 0))
        elif BIAS == 5:
            c = tl.load(SC)
            qf = qpos.to(tl.float32)
            if USE_THR:
                L = tl.load(SC + 1)
                ieff = tl.maximum(qf, L)
            else:
                ieff = qf
            if USE_LOG:
                den = tl.log(1.0 + c * ieff) + eps
                dden_dc = ieff / (1.0 + c * ieff)
            else:
                den = ieff + eps
                dden_dc = ieff * 0.0
            s1 = tl.sum(acc1, 1)
            sx = tl.sum(acc2, 1)
            dc = tl.sum(tl.where(mrow, (s1 - sx * dden_dc) / den, 0.0), 0)
            tl.store(part + NT + 1, dc)
            if USE_THR:
                if USE_LOG:
                    dden_dL = c / (1.0 + c * L)
                else:
                    dden_dL = 1.0
                # torch.maximum splits the gradient evenly at ties (qpos == L): match it
                wL = tl.where(qf < L, 1.0, tl.where(qf == L, 0.5, 0.0))
                dL = tl.sum(tl.where(mrow, -sx / den * dden_dL * wL, 0.0), 0)
                tl.store(part + NT + 2, dL)
