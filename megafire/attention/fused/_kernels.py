"""Triton kernels: FlashAttention-2 style attention with an in-kernel position bias (v3).

Scores (natural-log units) ``s_ij = scale * q_i . k_j + b_h(i, j)``; masked scores are
-inf; ``P = softmax(s)``; ``O = P V``. Internally the kernels work in base 2
(``s * log2(e)``; every bias table below is stored pre-multiplied by ``log2(e)``) and save
the base-2 log-sum-exp per row.

Backward (per score, recomputed): ``dP = dO V^T``, ``dS = P * (dP - delta)`` with
``delta_i = sum_d dO_id O_id``; ``dQ = scale dS K``, ``dK = scale dS^T Q``, ``dV = P^T dO``;
``dL/db_h(i, j) = dS_ij``, reduced in the ``dq`` kernel into a few sums per program
(row sums in registers, one partial row per program, no atomics per score).

Tiles. T5 and FIRE: a small kernel turns each block's position bounds (min / max of its
query positions and of its key positions: exact inside one document, packed documents
restarting positions included) into per-tile tables (segment / bucket range, may-mask flag,
per head the tile's scalars; ``_tile_table_kernel``) that the attention kernels read one tile
ahead. Every encoding, with segment ids: the range of live tiles per block (KST / QEN; tiles
whose query and key segment ranges are disjoint are fully masked: the loops skip those before
the first / after the last live one). The other encodings bound
a tile's distances by suffix-min / prefix-max arrays of the positions (``QMIN[i] =
min(qpos[i:])``, ``KMAX[j] = max(kpos[:j+1])``; exact for monotone positions, conservative
otherwise) to decide whether a tile needs the mask at all (interior tiles skip it).

* ALiBi ``b = -m_h r``; Kerple-log ``-r1 log(1 + r2 r)`` = ``-r1 ln2 lg2(1 + r2 r)``;
  Kerple-power ``-r1 r^r2`` = ``-r1 exp2(r2 lg2 r)`` (``lg2.approx``/``ex2.approx``, one MUFU
  op each). Kerple grads: two row-sum accumulators per program.
* T5 ``b = W[h, bucket(r)]``: the tile's bucket range ``[bucket(r_lo), bucket(r_hi)]``.
  One bucket (every tile with ``r_lo >= max_distance`` and many others): the bias is one
  scalar per tile. Up to KU boundaries: one step ``W[k] - W[k-1]`` per boundary where
  ``r >= T_k``. More (the tiles next to the diagonal, a second loop): one gather per score
  from ``TABR[h, min(r, RT)]``. Gradient: the tile's dS sum goes to
  bucket ``b_lo``; for each bucket boundary ``k`` inside the tile, the sum of dS with
  ``r >= T_k`` (first distance of bucket k) goes to ``G[k]``; bucket sums are
  ``base[k] + G[k] - G[k + 1]`` (PyTorch).
* FIRE ``b = f_h(x)``, ``x = psi(r) / den_i``: ``f_h`` is piecewise linear with kinks at the
  hidden units' ``-b1_k / w1_k``. PyTorch sorts the kinks and tabulates, per segment
  ``s`` between consecutive kinks, ``f = A[h, s] x + D[h, s]``, and per kink
  ``dA[h, t]`` (``f = A[s] x + D[s] + sum_t dA[t] relu(x - kink_t)`` exactly). A tile's
  ``x`` range (bounded from ``r_lo, r_hi`` and the rows' denominators, with a small
  margin) picks, through a 1024-bin table, the segment ``s_lo`` of its smallest ``x`` and
  the kinks ``[s_lo, s_hi)`` that may fall inside. Per score: ``lg2(1 + c r)`` (one MUFU
  op), one FMA with the row vector ``a ln2 / den_i``, plus 3 ops per kink term (KU terms,
  zero-weighted past the tile's last kink, in the pipelined loop; tiles with more kinks run
  in a second loop with a runtime kink loop). Backward: ``P = sum dS`` and ``Q = sum dS x`` of the tile go to segment
  ``s_lo``; per crossing kink the sums over ``x > kink`` go to ``G``/``GQ``; per row,
  ``sum dS f'(x) dpsi/dc`` and ``sum dS f'(x) x`` (for ``c`` and the denominator).
  PyTorch turns these into exact gradients of every MLP weight, ``c`` and ``den``.
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


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET:
    _patch_interpreter()

# bias modes (constexpr)
NONE, ALIBI, KERPLE_LOG, KERPLE_POW, T5, FIRE = 0, 1, 2, 3, 4, 5

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
#: FIRE: bins of [0, 1] for the tile -> segment-range lookup
FIRE_BINS = 1024
#: kinks (FIRE) / bucket boundaries (T5) per tile covered by the unrolled blocks of the
#: software-pipelined loops; tiles with more (next to the diagonal) take the general loop.
#: Measured fastest (H100, N=4096, D=64): T5 fwd 1.06 / 1.29 / 1.31 ms at KU = 1 / 4 / 8;
#: FIRE (branchless, 64x64 tiles) fwd 1.74 / 1.89 / 1.96 ms at KU = 1 / 2 / 4 (docs/kernels.md).
#: FIRE takes KU = 2 with split_heavy (2026-12-05, H200, packed rows: the split backward's heavy
#: launch then holds 0.3% of the tiles; CONFIGS in _function.py).
KU_DEFAULT = {"t5": 1, "fire": 2}


@triton.jit
def _lg2(x, FAST: tl.constexpr):
    if FAST:
        y = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        y = tl.math.log2(x)
    return y


@triton.jit
def _rcp_ge1(x):
    """1 / x for x >= 1 on the FMA pipe: the dq kernels already spend two MUFU ops per score
    (ex2, lg2), and a division would add a third. Seed ``0x7EF311C7 - bits(x)`` (relative
    error < 12%), three Newton steps ``y (2 - x y)`` (error squares each step: < 1e-7)."""
    y = (0x7EF311C7 - x.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
    y = y * (2.0 - x * y)
    y = y * (2.0 - x * y)
    return y * (2.0 - x * y)


@triton.jit
def _dlog_dc(rf, lg, c, RCP_EX2: tl.constexpr):
    """``r / (1 + c r)`` (d/dc of ln(1 + c r)), the factor of Kerple-log's ``r2`` and FIRE's ``c``
    gradients, given ``lg = lg2(1 + c r)`` of the bias: a Newton reciprocal on the FMA pipe
    (7 fp32 ops per score), or with RCP_EX2 ``r 2^-lg`` (one MUFU op and a multiply: FIRE's light
    dq loop 1,092 -> 881 SASS instructions per thread and tile at 64x64 / 4 warps, MUFU ops
    64 -> 96, docs/kernels.md)."""
    if RCP_EX2:
        y = rf * tl.math.exp2(-lg)
    else:
        y = rf * _rcp_ge1(1.0 + c * rf)
    return y


@triton.jit
def _tile_segs(BIAS: tl.constexpr, qlo, qhi, klo, khi, den_small, den_big, IT, SC, RT, NBINS,
               USE_LOG: tl.constexpr):
    """Head-independent tile scalars for tiles whose positions lie in [qlo, qhi] x [klo, khi]
    (conservative; elementwise, so it runs on vectors of tiles in the table kernel).

    FIRE: (s_lo, s_hi): segment of the smallest x and end of the kink range that may cross
    the tile. T5: (bucket(r_lo), bucket(r_hi)). Others: zeros.
    """
    s_lo = qlo * 0
    s_hi = qlo * 0
    if BIAS == 5:
        rlo = tl.maximum(qlo - khi, 0).to(tl.float32)
        rhi = tl.maximum(qhi - klo, 0).to(tl.float32)
        if USE_LOG:
            c = tl.load(SC)
            plo = tl.log(1.0 + c * rlo)
            phi = tl.log(1.0 + c * rhi)
        else:
            plo = rlo
            phi = rhi
        x_lo = plo / den_big
        x_hi = phi / den_small
        x_lo = x_lo - 1e-5 - 1e-5 * x_lo
        x_hi = x_hi + 1e-5 + 1e-5 * x_hi
        glo = tl.where(x_lo > 0.0, tl.minimum(x_lo * NBINS, NBINS - 1.0), 0.0).to(tl.int32)
        ghi = tl.where(x_hi < 1.0, tl.maximum(x_hi * NBINS, 0.0), NBINS - 1.0).to(tl.int32)
        s_lo = tl.load(IT + glo)
        s_hi = tl.load(IT + NBINS + ghi)
    elif BIAS == 4:
        rlo = tl.minimum(tl.maximum(qlo - khi, 0), RT)
        rhi = tl.minimum(tl.maximum(qhi - klo, 0), RT)
        s_lo = tl.load(IT + rlo)
        s_hi = tl.load(IT + rhi)
    return s_lo, s_hi


@triton.jit
def _tile_table_kernel(QLO, QHI, KLO, KHI, SQLO, SQHI, SKLO, SKHI, FT, IT, SC, TT, TA, SPL, SPC,
                       qb_sb, kb_sb, sqb_sb, skb_sb,
                       H, Tq, Tk, NS, RT, NBINS, nqb, nkb, eps, KU,
                       QSB, KSB, qsb_ps, qsb_sb, ksb_ps, ksb_sb,
                       BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, USE_LOG: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BLK: tl.constexpr, SEGB: tl.constexpr = False):
    """Per-tile scalars of a launch geometry (BM x BN tiles), read by the attention kernels
    with one independent load per tile instead of a dependent chain of table lookups.

    TT[bq, qb, kb] (int32) = s_lo | s_hi << 12 | may_mask << 24 (``may_mask``: the tile can
    hold a masked score: causal diagonal, ragged tail, segments);
    TA[bq, h, qb, kb, 0:2] = (a2, d2): FIRE's slope and offset of segment s_lo, T5's
    W[h, b_lo] (log2e units).
    Heavy tiles hold more kinks / bucket boundaries than the KU unrolled blocks cover (tiles
    next to the diagonal): SPL[bq, qb] (preset nkb) becomes the first heavy key block of the
    query block, SPC[bq, kb] (preset 0) one past the last heavy query block of the key block;
    the kernels run the tiles past / before these splits in a second, general loop.
    Bounds are those of each block (QLO/QHI[bq, qb]: min / max of the block's query positions;
    KLO/KHI likewise per key block): exact for a block inside one document, whatever the positions
    do elsewhere in the row (packed documents restart them: bounds over the whole prefix would make
    nearly every tile span every bucket / kink).
    Dead tiles (with segments: the query block's and key block's segment-id ranges are disjoint,
    so every score is masked) never count as heavy; the kernels' loops skip those before the first
    live key block / after the last live query block (KST / QEN, ``_live_ranges``).
    SEGB (with segments): when the two blocks share exactly one segment id s, the distance and
    denominator bounds are taken over the entries of s only (QSB / KSB [4, rows, blocks]: each
    block's position min / max over its first segment's entries, then over its last's), since
    only same-segment pairs are unmasked. A key block that straddles a document restart then no
    longer gives the later document's queries the earlier document's positions (distance range
    [0, everything]: every bucket / kink, the heavy loop for the rest of the row). Scores of the
    other segments in the tile are masked (``may_mask`` is set with segments), so the bias they
    get from the narrower bounds is never used.
    """
    pid = tl.program_id(0)
    bq = tl.program_id(1)
    eps = tl.cast(eps, tl.float32)
    t = pid * BLK + tl.arange(0, BLK)
    ok = t < nqb * nkb
    qb = t // nkb
    kb = t % nkb
    m0 = qb * BM
    n0 = kb * BN
    qlo = tl.load(QLO + bq * qb_sb + qb, mask=ok, other=0)
    qhi = tl.load(QHI + bq * qb_sb + qb, mask=ok, other=0)
    klo = tl.load(KLO + bq * kb_sb + kb, mask=ok, other=0)
    khi = tl.load(KHI + bq * kb_sb + kb, mask=ok, other=0)
    live = ok
    if HAS_SEG:
        sqlo = tl.load(SQLO + bq * sqb_sb + qb, mask=ok, other=0)
        sqhi = tl.load(SQHI + bq * sqb_sb + qb, mask=ok, other=0)
        sklo = tl.load(SKLO + bq * skb_sb + kb, mask=ok, other=0)
        skhi = tl.load(SKHI + bq * skb_sb + kb, mask=ok, other=0)
        live = ok & (sklo <= sqhi) & (skhi >= sqlo)
    # the mask decision below keeps the whole blocks' bounds; the bias bounds may narrow (SEGB)
    bqlo, bqhi, bklo, bkhi = qlo, qhi, klo, khi
    if HAS_SEG and SEGB:
        cs = tl.maximum(sqlo, sklo)
        one = cs == tl.minimum(sqhi, skhi)     # exactly one common segment id
        qf = one & (cs == sqlo)
        ql = one & (cs == sqhi) & ~qf
        kl = one & (cs == skhi)
        kf = one & (cs == sklo) & ~kl
        qrow = QSB + bq * qsb_sb + qb
        krow = KSB + bq * ksb_sb + kb
        bqlo = tl.where(qf, tl.load(qrow, mask=ok & qf, other=0), bqlo)
        bqhi = tl.where(qf, tl.load(qrow + qsb_ps, mask=ok & qf, other=0), bqhi)
        bqlo = tl.where(ql, tl.load(qrow + 2 * qsb_ps, mask=ok & ql, other=0), bqlo)
        bqhi = tl.where(ql, tl.load(qrow + 3 * qsb_ps, mask=ok & ql, other=0), bqhi)
        bklo = tl.where(kf, tl.load(krow, mask=ok & kf, other=0), bklo)
        bkhi = tl.where(kf, tl.load(krow + ksb_ps, mask=ok & kf, other=0), bkhi)
        bklo = tl.where(kl, tl.load(krow + 2 * ksb_ps, mask=ok & kl, other=0), bklo)
        bkhi = tl.where(kl, tl.load(krow + 3 * ksb_ps, mask=ok & kl, other=0), bkhi)
    den_small = qlo.to(tl.float32) * 0.0 + 1.0
    den_big = den_small
    if BIAS == 5:
        c = tl.load(SC)
        L = tl.load(SC + 1)
        ilo = tl.maximum(bqlo.to(tl.float32), L)
        ihi = tl.maximum(bqhi.to(tl.float32), L)
        if USE_LOG:
            den_small = tl.log(1.0 + c * ilo) + eps
            den_big = tl.log(1.0 + c * ihi) + eps
        else:
            den_small = ilo + eps
            den_big = ihi + eps
    s_lo, s_hi = _tile_segs(BIAS, bqlo, bqhi, bklo, bkhi, den_small, den_big, IT, SC, RT, NBINS, USE_LOG)
    need = (n0 + BN > Tk) | (m0 + BM > Tq)
    if CAUSAL:
        need = need | (n0 + BN - 1 > m0 + (Tk - Tq)) | (khi > qlo)
    if HAS_SEG:
        need = need | (Tq >= 0)
    tl.store(TT + bq * nqb * nkb + t, s_lo | (s_hi << 12) | (need.to(tl.int32) << 24), mask=ok)
    if BIAS == 5:
        heavy = live & (s_hi - s_lo > KU)
    else:
        heavy = live & (s_hi - s_lo >= KU)
    tl.atomic_min(SPL + bq * nqb + qb, kb, mask=heavy)
    tl.atomic_max(SPC + bq * nkb + kb, qb + 1, mask=heavy)
    for h in range(H):
        if BIAS == 5:
            a2 = tl.load(FT + h * NS + s_lo, mask=ok, other=0.0)
            d2 = tl.load(FT + H * NS + h * NS + s_lo, mask=ok, other=0.0)
        else:
            a2 = tl.load(FT + H * (RT + 1) + h * NS + s_lo, mask=ok, other=0.0) * 1.4426950408889634
            d2 = a2 * 0.0
        base = TA + ((bq * H + h) * nqb * nkb + t) * 2
        tl.store(base, a2, mask=ok)
        tl.store(base + 1, d2, mask=ok)


@triton.jit
def _add_bias(BIAS: tl.constexpr, s, h, qf, kf, rowf, s_lo, s_hi, a2, d2, P0, P1, FT, IT, SC, H, W, NS, RT,
              CAUSAL: tl.constexpr, USE_LOG: tl.constexpr, FAST: tl.constexpr, KU: tl.constexpr,
              HEAVY: tl.constexpr, BRANCHLESS: tl.constexpr = False, band=None):
    """Scores plus the bias (log2e units) of a tile; qf, kf: float positions broadcastable to the
    tile ([BM, 1] and [1, BN], or transposed); rowf (FIRE): ln2 / den (or 1 / den), like qf.
    HEAVY: 0 a light tile (unrolled blocks), 1 a heavy one (runtime loops; T5: a gather per score),
    2 (T5 with ``t5_band`` on an aligned row) a heavy tile whose bias is ``band``, the tile's
    per-head band tile in the tile's shape (``_band_tile``).

    Returns (s + bias2, rf, lg): rf = max(r, 0) and lg = lg2(1 + c rf) (FIRE's log; Kerple-log's with
    c = r2), lg2(rf) (Kerple-power: -inf at rf = 0), rf otherwise,
    for the callers that need them (unused ones are dropped by the compiler).
    The bias is added to ``s`` inside the guarded blocks (never yielded as a separate tile from
    an ``if``): the tile then stays in the MMA accumulator layout instead of taking a
    shared-memory layout conversion per tile. No per-score gathers, for the same reason.
    Kinks / bucket boundaries inside the tile: KU unrolled guarded blocks (light tiles, the
    software-pipelined loop), or a runtime loop (HEAVY: the second loop of the caller).
    """
    rf = tl.maximum(qf - kf, 0.0)
    lg = rf
    if BIAS == 1:
        m2 = tl.load(P0 + h) * 1.4426950408889634
        if CAUSAL:
            s += (kf - qf) * m2  # r < 0 only where masked
        else:
            s += rf * (-m2)
    elif BIAS == 2:
        r1 = tl.load(P0 + h)
        r2 = tl.load(P1 + h)
        lg = _lg2(1.0 + r2 * rf, FAST)
        s += lg * (-r1)  # -r1 ln(1 + r2 r) log2e = -r1 lg2(1 + r2 r)
    elif BIAS == 3:
        r1 = tl.load(P0 + h)
        r2 = tl.load(P1 + h)
        # d^r2 = 2^(r2 lg2 d): distances are integers (int32 positions), so d >= 1 or d = 0, and at d = 0
        # lg2 gives -inf and 2^-inf = 0 (r2 >= R_MIN > 0): the bias is exactly 0 there without the
        # clamp and select of lg2(max(d, 1)) (3 instructions a score; packed rows, sm_90: fwd loop
        # 1,760 -> 1,504 instructions per thread and 32 -> 8 B spilled, dkdv 1,138 -> 1,018; bitwise equal)
        lg = _lg2(rf, FAST)
        pw = tl.math.exp2(r2 * lg)
        s += pw * (-r1 * 1.4426950408889634)
    elif BIAS == 4:
        # W[h, b_lo] plus, per bucket boundary k in (b_lo, b_hi], the step W[k] - W[k-1]
        # where r >= T_k (the first distance of bucket k): exact, unrolled and guarded
        wb = FT + H * (RT + 1) + h * NS
        if HEAVY == 2:
            # the row's live scores have distance = index distance: the band tile holds the same
            # fp32 table values the gather below reads (bit-identical scores), loaded row-contiguous
            s += band * 1.4426950408889634
        elif HEAVY:
            # tiles next to the diagonal (~20 buckets): one gather per score from the per-distance
            # table; its layout conversion is paid on these few tiles only
            ri = tl.minimum(rf, RT * 1.0).to(tl.int32)
            s += tl.load(FT + h * (RT + 1) + ri) * 1.4426950408889634
        else:
            s += a2
            if s_hi > s_lo:
                for u in tl.static_range(1, KU):
                    if s_lo + u <= s_hi:
                        thr = tl.load(IT + RT + 1 + s_lo + u).to(tl.float32)
                        step = (tl.load(wb + s_lo + u) - tl.load(wb + s_lo + u - 1)) * 1.4426950408889634
                        s += tl.where(rf >= thr, step, 0.0)
    elif BIAS == 5:
        if USE_LOG:
            c = tl.load(SC)
            lg = _lg2(1.0 + c * rf, FAST)
        s += lg * (rowf * a2) + d2
        # kinks that may cross the tile (none on most tiles): unrolled and guarded, not a
        # loop, so that the K/V loop around this stays innermost (software-pipelined)
        offk = 2 * H * NS + H * W
        if HEAVY:
            for t in range(s_lo, s_hi):
                kt = tl.load(FT + offk + t)
                da = tl.load(FT + 2 * H * NS + h * W + t)
                s += da * tl.maximum(lg * rowf - kt, 0.0)
        elif BRANCHLESS:
            # every light tile adds KU kink terms, zero-weighted past s_hi: no branch in the
            # loop body (a branch made the compiler duplicate the body; measured slower)
            for u in tl.static_range(KU):
                t = tl.minimum(s_lo + u, W - 1)
                kt = tl.load(FT + offk + t)
                da = tl.where(s_lo + u < s_hi, tl.load(FT + 2 * H * NS + h * W + t), 0.0)
                s += da * tl.maximum(lg * rowf - kt, 0.0)
        else:
            if s_hi > s_lo:
                for u in tl.static_range(KU):
                    if s_lo + u < s_hi:
                        kt = tl.load(FT + offk + s_lo + u)
                        da = tl.load(FT + 2 * H * NS + h * W + s_lo + u)
                        s += da * tl.maximum(lg * rowf - kt, 0.0)
    return s, rf, lg


@triton.jit
def _mask(CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, offs_m, offs_n, qpos, kpos, sq, sk, Tq, Tk,
          FOLD: tl.constexpr = True):
    """Which scores of a tile are live: query i < Tq, key j < Tk, ``j <= i + Tk - Tq`` (causal),
    ``kpos_j <= qpos_i`` (causal) and ``sq_i == sk_j`` (segment ids).

    FOLD: the first three are one compare per score, against a per-row limit on the key index
    (``i + Tk - Tq`` causal, else ``Tk - 1``; -1 past Tq). LLVM lowers a where() of an and of
    conditions to one select per condition: a masked 64x64 tile costs 3 compares and 3 selects per
    score instead of 5 and 5 (SASS of the fwd / dq / one-pass kernels, sm_90a: the mask block
    -20%, e.g. FIRE dq 341 -> 273 instructions per thread). The dkdv kernels of FIRE and of no bias
    keep the five (FOLD=False there): folded, ptxas spills inside FIRE's heavy-tile loop (68 -> 148
    bytes), and the no-bias 32x128 tile loop grows (818 -> 856 instructions: predicate LOP3s)."""
    if FOLD:
        if CAUSAL:
            lim = tl.where(offs_m < Tq, offs_m + (Tk - Tq), -1)
        else:
            lim = tl.where(offs_m < Tq, Tk - 1, -1)
        valid = offs_n <= lim
    else:
        valid = (offs_m < Tq) & (offs_n < Tk)
        if CAUSAL:
            valid = valid & (offs_n <= offs_m + (Tk - Tq))
    if CAUSAL:
        valid = valid & (kpos <= qpos)
    if HAS_SEG:
        valid = valid & (sq == sk)
    return valid


@triton.jit
def _run_mask(x, fill, offs_m, offs_n, rlo, Tq, Tk):
    """``run_mask`` (causal, a row whose ``_aligned_rows`` flag is set): the live keys of query i are
    the index run ``[rlo_i, i + Tk - Tq]`` (``rlo_i`` the first key of its segment; segments are runs,
    positions step by one inside them, so the positions' causal order and the segment test are that
    run): two compares against per-row bounds and one select per score, no key positions or segment
    ids (those of ``_mask`` are 3 compares and 3 selects per score and two column loads per tile).
    ``offs_m`` / ``rlo`` broadcast like the tile's rows (or its columns, transposed), ``offs_n`` its
    keys."""
    lim = tl.where(offs_m < Tq, offs_m + (Tk - Tq), -1)
    return tl.where((offs_n <= lim) & (offs_n >= rlo), x, fill)


@triton.jit
def _full_mask_q(x, fill, SQ, b, sq_sb, offs_m, mrow, offs_n, qpos, kpos, sk, Tq, Tk, CAUSAL: tl.constexpr,
                 HAS_SEG: tl.constexpr, FOLD: tl.constexpr, TRANS: tl.constexpr):
    """``_mask`` on a tile of the key-block kernels (the query tile's segment ids loaded here): [BM, BN]
    (one-pass), or TRANS [BN, BM] (dkdv)."""
    sq = offs_m * 0
    if HAS_SEG:
        sq = tl.load(SQ + b * sq_sb + offs_m, mask=mrow, other=-1)
    if TRANS:
        valid = _mask(CAUSAL, HAS_SEG, offs_m[None, :], offs_n[:, None], qpos[None, :], kpos[:, None],
                      sq[None, :], sk[:, None], Tq, Tk, FOLD)
    else:
        valid = _mask(CAUSAL, HAS_SEG, offs_m[:, None], offs_n[None, :], qpos[:, None], kpos[None, :],
                      sq[:, None], sk[None, :], Tq, Tk, FOLD)
    return tl.where(valid, x, fill)


@triton.jit
def _mask_cols_tile(x, fill, SQ, SEGLO, b, sq_sb, offs_m, mrow, offs_n, qpos, kpos, sk, Tq, Tk, CAUSAL: tl.constexpr,
                    HAS_SEG: tl.constexpr, FOLD: tl.constexpr, TRANS: tl.constexpr, RUN: tl.constexpr):
    """A tile of the key-block kernels with its masked entries set to ``fill``: the run mask in a launch
    for the aligned rows (RUN; SEGLO: this row's first key per query, ``_row_flags``), else ``_mask``."""
    if RUN:
        rlo = offs_m * 0
        if HAS_SEG:
            rlo = tl.load(SEGLO + offs_m, mask=mrow, other=0)
        if TRANS:
            x = _run_mask(x, fill, offs_m[None, :], offs_n[:, None], rlo[None, :], Tq, Tk)
        else:
            x = _run_mask(x, fill, offs_m[:, None], offs_n[None, :], rlo[:, None], Tq, Tk)
    else:
        x = _full_mask_q(x, fill, SQ, b, sq_sb, offs_m, mrow, offs_n, qpos, kpos, sk, Tq, Tk, CAUSAL, HAS_SEG, FOLD,
                         TRANS)
    return x


@triton.jit
def _need_mask(CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, m0, m1, n0, n1, qlo, khi, Tq, Tk,
               SKIP: tl.constexpr):
    """Whether the tile rows [m0, m1) x cols [n0, n1) may hold a masked score (m1, n1 past-the-end).
    SKIP=False: always (every tile masked, as in v1)."""
    need = (n1 > Tk) | (not SKIP)
    if CAUSAL:
        need = need | (n1 - 1 > m0 + (Tk - Tq)) | (khi > qlo)
    if HAS_SEG:
        need = need | (Tq >= 0)
    return need


@triton.jit
def _mask_rows_tile(x, fill, rec, KMAX, SK, b, kp_sb, sk_sb, start_n, offs_n, mcol, offs_m, qpos, kpos, sq, m0, qlo,
                    Tq, Tk, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, SKIP: tl.constexpr, TABLE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, FOLD: tl.constexpr = True, RUN: tl.constexpr = False,
                    rlo=None):
    """A [BM, BN] tile of the row-major kernels (fwd, dq) with its masked entries set to
    ``fill``; tiles that cannot hold a masked score (tile record or position bounds) skip it.
    RUN (a launch for the aligned rows): the run mask (``_run_mask``, rows' first keys ``rlo``)."""
    if TABLE:
        need = ((rec >> 24) != 0) | (not SKIP)
    else:
        khi = tl.load(KMAX + b * kp_sb + tl.minimum(start_n + BN, Tk) - 1)
        need = _need_mask(CAUSAL, HAS_SEG, m0, m0 + BM, start_n, start_n + BN, qlo, khi, Tq, Tk, SKIP)
    if need:
        if RUN:
            x = _run_mask(x, fill, offs_m[:, None], offs_n[None, :], rlo[:, None], Tq, Tk)
        else:
            x = _full_mask_rows(x, fill, SK, b, sk_sb, offs_n, mcol, offs_m, qpos, kpos, sq, Tq, Tk, CAUSAL, HAS_SEG,
                                FOLD)
    return x


@triton.jit
def _full_mask_rows(x, fill, SK, b, sk_sb, offs_n, mcol, offs_m, qpos, kpos, sq, Tq, Tk, CAUSAL: tl.constexpr,
                    HAS_SEG: tl.constexpr, FOLD: tl.constexpr):
    """``_mask`` on a [BM, BN] tile of the row-major kernels (the key tile's segment ids loaded here)."""
    sk = offs_n * 0
    if HAS_SEG:
        sk = tl.load(SK + b * sk_sb + offs_n, mask=mcol, other=-2)
    valid = _mask(CAUSAL, HAS_SEG, offs_m[:, None], offs_n[None, :], qpos[:, None], kpos[None, :],
                  sq[:, None], sk[None, :], Tq, Tk, FOLD)
    return tl.where(valid, x, fill)


@triton.jit
def _col_program(K, V, KP, KMAX, SK, QEN, SPC, b, hk, pid_n, n0, offs_n, offs_d, mcol, skb, skt, skh, svb, svt, svh,
                 kp_sb, sk_sb, tab_b, Tq, Tk, nkb, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, TABLE: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr):
    """A key-block program's (dkdv, one-pass) key block and query range: (K, V [BN, D], key positions
    (int, float), their running max at the block's end, key segment ids, first query tile, end of the
    heavy tiles (SPC), end of the live query tiles). The offsets come from the caller: inductor's
    mutation analysis takes a call's results as computed from all of its arguments, so a store
    address built from them would mark K, V and the tables as written."""
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=mcol[:, None], other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], mask=mcol[:, None], other=0.0)
    kpos = tl.load(KP + b * kp_sb + offs_n, mask=mcol, other=0)
    khi = tl.load(KMAX + b * kp_sb + tl.minimum(n0 + BN, Tk) - 1)
    sk = offs_n * 0
    if HAS_SEG:
        sk = tl.load(SK + b * sk_sb + offs_n, mask=mcol, other=-2)
    lo = 0
    if CAUSAL:
        lo = tl.maximum(n0 - (Tk - Tq), 0)
        lo = (lo // BM) * BM
    bt = b * tab_b
    split = lo
    end = Tq
    if HAS_SEG:   # query blocks from QEN on hold other documents only (``_live_ranges``)
        end = tl.minimum(Tq, tl.load(QEN + bt * nkb + pid_n) * BM)
    if TABLE:
        split = tl.minimum(end, tl.maximum(lo, tl.load(SPC + bt * nkb + pid_n) * BM))
    return k, v, kpos, kpos.to(tl.float32), khi, sk, lo, split, end


@triton.jit
def _col_tables(TT, TA, bt, h, H, nqb, nkb, pid_n):
    """This key block's column of the tile tables (stride nkb between query blocks) for head h."""
    return TT + bt * nqb * nkb + pid_n, TA + (bt * H + h) * nqb * nkb * 2 + pid_n * 2


@triton.jit
def _query_tile(Q, DO, LSE, DELTA, QP, b, h, H, offs_m, mrow, offs_d, sqb, sqt, sqh, sdob, sdot, sdoh, qp_sb, Tq):
    """The key-block kernels' query tile at offs_m (rows, row mask from the caller: see ``_col_program``):
    (Q, dO [BM, D], LSE, delta, query positions)."""
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=mrow[:, None], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=mrow[:, None],
                 other=0.0)
    lse = tl.load(LSE + (b * H + h) * Tq + offs_m, mask=mrow, other=float("inf"))
    delta = tl.load(DELTA + (b * H + h) * Tq + offs_m, mask=mrow, other=0.0)
    return q, do, lse, delta, tl.load(QP + b * qp_sb + offs_m, mask=mrow, other=0)


@triton.jit
def _query_rowf(ROWF, b, qp_sb, offs_m, mrow, qpos, BIAS: tl.constexpr):
    """FIRE's ln2 / den of the query rows (zeros for the other encodings). Loaded where each step
    used it before this helper: moving the load ahead of the dkdv kernel's score MMA changed its
    FIRE spills (68 -> 116 bytes at D=64, untimed)."""
    rowf = qpos.to(tl.float32) * 0.0
    if BIAS == 5:
        rowf = tl.load(ROWF + b * qp_sb + offs_m, mask=mrow, other=0.0)
    return rowf


@triton.jit
def _col_need(rec, QMIN, b, qp_sb, start_m, n0, khi, Tq, Tk, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
              SKIP: tl.constexpr, TABLE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Whether the key-block kernels' tile (query tile start_m, key block n0) may hold a masked score."""
    if TABLE:
        need = ((rec >> 24) != 0) | (not SKIP)
    else:
        qlo = tl.load(QMIN + b * qp_sb + start_m)
        need = _need_mask(CAUSAL, HAS_SEG, start_m, start_m + BM, n0, n0 + BN, qlo, khi, Tq, Tk, SKIP)
    return need


@triton.jit
def _store_dkdv(DK, DV, dk, dv, b, hk, offs_n, offs_d, mcol, skb, skt, skh, svb, svt, svh):
    """dK, dV of a key block (cast to the inputs' dtype)."""
    tl.store(DK + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=mcol[:, None])
    tl.store(DV + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=mcol[:, None])


@triton.jit
def _onepass_step(start_m, rec, a2, d2, k, v, kf, kpos, sk, offs_n, offs_d, n0, khi, dk, dv,
                  acc1, acc2, runP, runQ, cur, gacc, c, part,
                  Q, DO, DQA, LSE, DELTA, QP, SQ, QMIN, ROWF, ROWC, ROWX, P0, P1, FT, IT, SC, b, h,
                  sqb, sqt, sqh, sdob, sdot, sdoh, qp_sb, sq_sb, H, W, NS, RT, Tq, Tk, scale2, scale,
                  BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, USE_LOG: tl.constexpr,
                  FAST: tl.constexpr, DOT_PREC: tl.constexpr, SKIP: tl.constexpr, PGRAD: tl.constexpr,
                  TABLE: tl.constexpr, KU: tl.constexpr, HEAVY: tl.constexpr, NSP: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, DEFER: tl.constexpr, RCP_EX2: tl.constexpr = False,
                  FOLD: tl.constexpr = True, scr=None, DIAG: tl.constexpr = False, RTP: tl.constexpr = 16,
                  W2: tl.constexpr = 16, band=None, RUN: tl.constexpr = False, SEGLO=None):
    """One query tile [BM, BN] of the one-pass backward: scores, P and dS computed once for dV, dK
    (accumulated in registers), dQ (``scale dS K`` added to the fp32 DQA, atomically: every key
    block's program adds to the same rows) and the parameter sums (``_pgrad_tile``; FIRE's per-row
    sums of this tile added to ROWC / ROWX)."""
    offs_m = start_m + tl.arange(0, BM)
    mrow = offs_m < Tq
    q, do, lse, delta, qpos = _query_tile(Q, DO, LSE, DELTA, QP, b, h, H, offs_m, mrow, offs_d, sqb, sqt, sqh, sdob,
                                          sdot, sdoh, qp_sb, Tq)
    qf = qpos.to(tl.float32)
    bh = b * H + h
    s_lo = rec & 4095
    s_hi = (rec >> 12) & 4095
    rowf = _query_rowf(ROWF, b, qp_sb, offs_m, mrow, qpos, BIAS)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale2  # [BM, BN]
    s, rf, lg = _add_bias(BIAS, s, h, qf[:, None], kf[None, :], rowf[:, None], s_lo, s_hi, a2, d2, P0, P1, FT, IT,
                          SC, H, W, NS, RT, CAUSAL, USE_LOG, FAST, KU, HEAVY, False, band)
    p = tl.math.exp2(s - lse[:, None])
    if _col_need(rec, QMIN, b, qp_sb, start_m, n0, khi, Tq, Tk, CAUSAL, HAS_SEG, SKIP, TABLE, BM, BN):
        p = _mask_cols_tile(p, 0.0, SQ, SEGLO, b, sq_sb, offs_m, mrow, offs_n, qpos, kpos, sk, Tq, Tk, CAUSAL,
                            HAS_SEG, FOLD, False, RUN)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dsb = ds.to(q.dtype)
    dk += tl.dot(tl.trans(dsb), q, input_precision=DOT_PREC)
    dqt = tl.dot(dsb, k, input_precision=DOT_PREC) * scale   # [BM, D]
    tl.atomic_add(DQA + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], dqt, mask=mrow[:, None],
                  sem="relaxed")
    if PGRAD:
        if BIAS == 5:
            # this tile's rows only: the row sums go to ROWC / ROWX now (other key blocks add theirs)
            t1, t2, runP, runQ, cur, gacc = _pgrad_tile(ds, rf, lg, rowf, a2, s_lo, s_hi, h, c, part, acc1 * 0.0,
                                                        acc2 * 0.0, runP, runQ, cur, gacc, P1, FT, IT, H, W, NS,
                                                        RT, BIAS, USE_LOG, KU, HEAVY, NSP, DEFER, RCP_EX2, 0, part,
                                                        False, 16, 16, BM, BN)
            if USE_LOG:
                tl.atomic_add(ROWC + bh * Tq + offs_m, t1, mask=mrow, sem="relaxed")
            tl.atomic_add(ROWX + bh * Tq + offs_m, t2, mask=mrow, sem="relaxed")
        else:
            acc1, acc2, runP, runQ, cur, gacc = _pgrad_tile(ds, rf, lg, rowf, a2, s_lo, s_hi, h, c, part, acc1,
                                                            acc2, runP, runQ, cur, gacc, P1, FT, IT, H, W, NS, RT,
                                                            BIAS, USE_LOG, KU, HEAVY, NSP, DEFER, RCP_EX2,
                                                            start_m - n0 + (Tk - Tq), scr, DIAG, RTP, W2, BM, BN)
    return dk, dv, acc1, acc2, runP, runQ, cur, gacc


@triton.jit
def _bwd_onepass_kernel(Q, K, V, DO, DQA, DK, DV, LSE, DELTA, QP, KP, SQ, SK, QMIN, KMAX,
                        P0, P1, FT, IT, SC, ROWF, TT, TA, SPC, QEN, PART, ROWC, ROWX, SCR, BT, ALN, SEGLO,
                        sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
                        qp_sb, kp_sb, sq_sb, sk_sb, tab_b,
                        H, HKV, GROUP, Tq, Tk, W, NS, RT, nqb, nkb, scale2, scale, part_stride, BD, NT,
                        BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
                        USE_LOG: tl.constexpr, FAST: tl.constexpr, DOT_PREC: tl.constexpr, SKIP: tl.constexpr,
                        PGRAD: tl.constexpr, TABLE: tl.constexpr, KU: tl.constexpr,
                        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NSP: tl.constexpr = 16,
                        DEFER: tl.constexpr = False, RCP_EX2: tl.constexpr = False, FOLD: tl.constexpr = True,
                        DIAG: tl.constexpr = False, RTP: tl.constexpr = 16, W2: tl.constexpr = 16,
                        BAND: tl.constexpr = False, BG: tl.constexpr = 16, RUN: tl.constexpr = False,
                PICK: tl.constexpr = False):
    """The whole backward in one pass (``onepass`` in CONFIGS): one program per (key block, batch, kv
    head), as ``_bwd_dkdv_kernel``, with each score's bias, P and dS computed once instead of once
    in each of the dq and dkdv kernels (FlashAttention-2's CUDA backward): dK, dV in registers,
    dQ added atomically to the fp32 DQA [B, Tq, H, D] (strides of Q), the parameter sums as the
    dq kernel's (``_pgrad_tile``) into PART rows ``(b H + h) nkb + key block`` (FIRE: per-row
    sums added to ROWC / ROWX, zeroed by the caller). Query tiles before SPC (heavy) run first,
    with runtime kink / boundary loops. DIAG (T5): the heavy tiles' per-distance sums (see
    ``_t5_diagonals``; scratch SCR, BM BN + W2 fp32 per program) to PART ``[2 NS, 2 NS + RT]``.
    BAND (T5): heavy tiles of aligned rows take band tiles (see ``_fwd_kernel``) and, with DIAG,
    skip the per-tile alignment check (the row's flag holds it for every tile)."""
    pid_n = tl.program_id(0)
    scale2, scale = tl.cast(scale2, tl.float32), tl.cast(scale, tl.float32)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    n0 = pid_n * BN
    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    mcol = offs_n < Tk
    k, v, kpos, kf, khi, sk, lo, split, end = _col_program(
        K, V, KP, KMAX, SK, QEN, SPC, b, hk, pid_n, n0, offs_n, offs_d, mcol, skb, skt, skh, svb, svt, svh, kp_sb,
        sk_sb, tab_b, Tq, Tk, nkb, CAUSAL, HAS_SEG, TABLE, BM, BN)
    bt = b * tab_b
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    c = 0.0
    if BIAS == 5:
        c = tl.load(SC)
    scr = SCR + (bhk * nkb + pid_n) * (BM * BN + W2)
    aligned, seglo = _col_flags(ALN, SEGLO, bt, Tq, BAND, PICK)
    if _pick(aligned, PICK, RUN):
        for hh in range(0, GROUP):
            h = hk * GROUP + hh
            part = PART + ((b * H + h) * nkb + pid_n) * part_stride
            acc1 = tl.zeros([BM], tl.float32)  # Kerple row sums (summed over the program)
            acc2 = tl.zeros([BM], tl.float32)
            runP = tl.zeros([BM], tl.float32)  # T5 / FIRE: running sums of the current segment / bucket
            runQ = tl.zeros([BM], tl.float32)
            cur = lo * 0 - 1
            gacc = 0.0
            tt, ta = _col_tables(TT, TA, bt, h, H, nqb, nkb, pid_n)
            if TABLE:
                if DIAG and PGRAD and (BIAS == 4):
                    gacc = tl.zeros([RTP], tl.float32)
                elif DEFER and PGRAD and (BIAS == 4):
                    gacc = tl.zeros([BM, NSP], tl.float32)
                if BAND and (aligned != 0):
                    for start_m in range(lo, split, BM):
                        rec, a2, d2 = _tile_next(TABLE, tt, ta, (start_m // BM) * nkb)
                        band = _band_tile(BT, h, start_m - n0 + (Tk - Tq), BD, NT, BG, BM, BN)
                        dk, dv, acc1, acc2, runP, runQ, cur, gacc = _onepass_step(
                            start_m, rec, a2, d2, k, v, kf, kpos, sk, offs_n, offs_d, n0, khi, dk, dv,
                            acc1, acc2, runP, runQ, cur, gacc, c, part, Q, DO, DQA, LSE, DELTA, QP, SQ, QMIN, ROWF,
                            ROWC, ROWX, P0, P1, FT, IT, SC, b, h, sqb, sqt, sqh, sdob, sdot, sdoh, qp_sb, sq_sb, H, W,
                            NS, RT, Tq, Tk, scale2, scale, BIAS, CAUSAL, HAS_SEG, USE_LOG, FAST, DOT_PREC, SKIP, PGRAD,
                            TABLE, KU, 2, NSP, BM, BN, DEFER, RCP_EX2, FOLD, scr, DIAG, RTP, W2, band, RUN,
                            seglo)
                else:
                    for start_m in range(lo, split, BM):
                        rec, a2, d2 = _tile_next(TABLE, tt, ta, (start_m // BM) * nkb)
                        dk, dv, acc1, acc2, runP, runQ, cur, gacc = _onepass_step(
                            start_m, rec, a2, d2, k, v, kf, kpos, sk, offs_n, offs_d, n0, khi, dk, dv,
                            acc1, acc2, runP, runQ, cur, gacc, c, part, Q, DO, DQA, LSE, DELTA, QP, SQ, QMIN, ROWF,
                            ROWC, ROWX, P0, P1, FT, IT, SC, b, h, sqb, sqt, sqh, sdob, sdot, sdoh, qp_sb, sq_sb, H, W,
                            NS, RT, Tq, Tk, scale2, scale, BIAS, CAUSAL, HAS_SEG, USE_LOG, FAST, DOT_PREC, SKIP, PGRAD,
                            TABLE, KU, 1, NSP, BM, BN, DEFER, RCP_EX2, FOLD, scr, DIAG, RTP, W2, None, RUN,
                            seglo)
                _heavy_sums(part, gacc, NS, RT, PGRAD, BIAS, DIAG, DEFER, RTP, NSP)
            nograd = 0.0
            rec_n, a2_n, d2_n = _tile_next(TABLE, tt, ta, tl.minimum(split // BM, nqb - 1) * nkb)
            for start_m in range(split, end, BM):
                rec, a2, d2 = rec_n, a2_n, d2_n
                rec_n, a2_n, d2_n = _tile_next(TABLE, tt, ta, tl.minimum(start_m // BM + 1, nqb - 1) * nkb)
                dk, dv, acc1, acc2, runP, runQ, cur, nograd = _onepass_step(
                    start_m, rec, a2, d2, k, v, kf, kpos, sk, offs_n, offs_d, n0, khi, dk, dv,
                    acc1, acc2, runP, runQ, cur, nograd, c, part, Q, DO, DQA, LSE, DELTA, QP, SQ, QMIN, ROWF, ROWC,
                    ROWX, P0, P1, FT, IT, SC, b, h, sqb, sqt, sqh, sdob, sdot, sdoh, qp_sb, sq_sb, H, W, NS, RT, Tq,
                    Tk, scale2, scale, BIAS, CAUSAL, HAS_SEG, USE_LOG, FAST, DOT_PREC, SKIP, PGRAD, TABLE, KU,
                    False, NSP, BM, BN, False, RCP_EX2, FOLD, scr, False, RTP, W2, None, RUN, seglo)
            if PGRAD:
                _program_sums(part, acc1, acc2, runP, runQ, cur, NS, BIAS, NSP)
        _store_dkdv(DK, DV, dk * scale, dv, b, hk, offs_n, offs_d, mcol, skb, skt, skh, svb, svt, svh)


@triton.jit
def _row_program(K, V, TT, TA, SPL, KST, b, h, hk, pid_m, m0, skb, skh, svb, svh, tab_b, H, Tq, Tk, nqb, nkb,
                 CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, TABLE: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr):
    """A query-block program's key range: (start of the live keys, end of the visible keys, end
    of the pipelined loop's light tiles, K and V bases, this row's tile-table rows)."""
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, m0 + BM + (Tk - Tq))
    bt = b * tab_b
    lo = hi * 0
    if HAS_SEG:   # key blocks before KST hold other documents only (``_live_ranges``)
        lo = tl.minimum(hi, tl.load(KST + bt * nqb + pid_m) * BN)
    split = hi
    if TABLE:
        split = tl.maximum(lo, tl.minimum(hi, tl.load(SPL + bt * nqb + pid_m) * BN))
    return (lo, hi, split, K + b * skb + hk * skh, V + b * svb + hk * svh, TT + (bt * nqb + pid_m) * nkb,
            TA + ((bt * H + h) * nqb + pid_m) * nkb * 2)


@triton.jit
def _band_tile(BT, h, d0, BD, NT, BG: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """T5 ``t5_band``: the fp32 bias (table units) of a tile whose live scores have distance
    ``clamp(d0 + i - j, 0, RT)`` (i, j its query row and key column from the tile's first; ``d0`` the
    index distance at its first row and column): tile ``t = clamp((d0 - BD) / BG, 0, NT - 1)`` of
    head h in BT [H, NT, R, C] (``_band_table``; BD the first band's ``d0``, BG = gcd(BM, BN) its step:
    the ``d0`` of a launch's tiles all differ by multiples of BG; the first and last bands are
    constant, so clamping is exact). R x C the tile's shape as the caller holds it (the dkdv kernel's
    transposed scores: keys x queries, from a table built transposed). Rows are
    contiguous and 16-byte aligned: vector loads, no per-score address (the gather it replaces
    computes each score's distance and address and loads 4 bytes)."""
    t = tl.minimum(tl.maximum(d0 - BD, 0) // BG, NT - 1)
    base = BT + (h * NT + t) * (R * C)
    return tl.load(base + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :])


@triton.jit
def _pick(aligned, PICK: tl.constexpr, RUN: tl.constexpr):
    """Whether this program's batch row is one its launch computes: every row, or with PICK (``run_mask``
    launches each kernel twice) the aligned rows (RUN: the run mask) or the others (the full mask). A
    runtime choice inside one loop would hold both masks; LLVM merges their selects into bit-packed
    predicates (sm_90a SASS: the run-mask tile 171 instructions per thread instead of ~45)."""
    go = aligned == aligned
    if PICK:
        if RUN:
            go = aligned != 0
        else:
            go = aligned == 0
    return go


@triton.jit
def _row_flags(ALN, SEGLO, b, tab_b, offs_m, mrow, Tq, HAS_SEG: tl.constexpr, BAND: tl.constexpr, RUN: tl.constexpr,
               PICK: tl.constexpr):
    """(aligned, rlo) of a query-block program: the row's ``_aligned_rows`` flag (0 without BAND / PICK)
    and, for RUN with segment ids, each query's first key (SEGLO [tab rows, Tq]; zeros otherwise)."""
    aligned = b * 0
    if BAND or PICK:
        aligned = tl.load(ALN + b * tab_b)
    rlo = offs_m * 0
    if RUN and HAS_SEG:
        rlo = tl.load(SEGLO + b * tab_b * Tq + offs_m, mask=mrow, other=0)
    return aligned, rlo


@triton.jit
def _col_flags(ALN, SEGLO, bt, Tq, BAND: tl.constexpr, PICK: tl.constexpr):
    """(aligned, first keys) of a key-block program (one-pass, dkdv): the row's flag (0 without BAND /
    PICK) and where its queries' first keys start in SEGLO (RUN loads them per query tile)."""
    aligned = bt * 0
    if BAND or PICK:
        aligned = tl.load(ALN + bt)
    return aligned, SEGLO + bt * Tq


@triton.jit
def _key_tile(start_n, rec, kbase, vbase, KP, b, kp_sb, skt, svt, offs_d, Tk, BN: tl.constexpr):
    """The row-major kernels' key tile at start_n: (offs_n, column mask, K, V, key positions)
    and the tile record's segment / bucket range (s_lo, s_hi)."""
    offs_n = start_n + tl.arange(0, BN)
    mcol = offs_n < Tk
    k = tl.load(kbase + offs_n[:, None] * skt + offs_d[None, :], mask=mcol[:, None], other=0.0)
    v = tl.load(vbase + offs_n[:, None] * svt + offs_d[None, :], mask=mcol[:, None], other=0.0)
    kpos = tl.load(KP + b * kp_sb + offs_n, mask=mcol, other=0)
    return offs_n, mcol, k, v, kpos, rec & 4095, (rec >> 12) & 4095


@triton.jit
def _tile_next(TABLE: tl.constexpr, tt, ta, i):
    """Tile i's record and (a2, d2) from the per-row tile tables (or zeros without TABLE)."""
    if TABLE:
        rec = tl.load(tt + i)
        a2 = tl.load(ta + 2 * i)
        d2 = tl.load(ta + 2 * i + 1)
    else:
        rec = i * 0
        a2 = i.to(tl.float32) * 0.0
        d2 = a2
    return rec, a2, d2


@triton.jit
def _fwd_step(start_n, rec, a2, d2, q, qf, qpos, rowf, sq, offs_m, offs_d, m0, qlo, m_i, l_i, acc,
              kbase, vbase, KP, SK, KMAX, P0, P1, FT, IT, SC, b, h, skt, svt, kp_sb, sk_sb,
              H, W, NS, RT, Tq, Tk, scale2,
              BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, USE_LOG: tl.constexpr,
              FAST: tl.constexpr, DOT_PREC: tl.constexpr, SKIP: tl.constexpr, PRES: tl.constexpr,
              TABLE: tl.constexpr, KU: tl.constexpr, HEAVY: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              BRANCHLESS: tl.constexpr, FOLD: tl.constexpr = True, band=None, RUN: tl.constexpr = False,
              rlo=None):
    """One key tile of the forward: scores, bias, mask, online softmax, P V."""
    offs_n, mcol, k, v, kpos, s_lo, s_hi = _key_tile(start_n, rec, kbase, vbase, KP, b, kp_sb, skt, svt, offs_d,
                                                     Tk, BN)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale2
    if BIAS != 0:
        s, _rf, _lg = _add_bias(BIAS, s, h, qf[:, None], kpos.to(tl.float32)[None, :], rowf[:, None],
                                s_lo, s_hi, a2, d2, P0, P1, FT, IT, SC, H, W, NS, RT, CAUSAL, USE_LOG, FAST, KU,
                                HEAVY, BRANCHLESS, band)
    s = _mask_rows_tile(s, float("-inf"), rec, KMAX, SK, b, kp_sb, sk_sb, start_n, offs_n, mcol, offs_m, qpos, kpos,
                        sq, m0, qlo, Tq, Tk, CAUSAL, HAS_SEG, SKIP, TABLE, BM, BN, FOLD, RUN, rlo)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    pb = p.to(v.dtype)
    pv = tl.dot(pb, v, input_precision=DOT_PREC)
    if PRES:
        pv = tl.dot((p - pb.to(tl.float32)).to(v.dtype), v, pv, input_precision=DOT_PREC)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(Q, K, V, O, ORES, LSE, QP, KP, SQ, SK, QMIN, KMAX, P0, P1, FT, IT, SC, ROWF, TT, TA,
                SPL, KST, BT, ALN, SEGLO, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                qp_sb, kp_sb, sq_sb, sk_sb, tab_b,
                H, GROUP, Tq, Tk, W, NS, RT, nqb, nkb, scale2, BD, NT,
                BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
                USE_LOG: tl.constexpr, FAST: tl.constexpr, DOT_PREC: tl.constexpr, SKIP: tl.constexpr,
                RESID: tl.constexpr, PRES: tl.constexpr, TABLE: tl.constexpr, KU: tl.constexpr,
                D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BRANCHLESS: tl.constexpr = True,
                FOLD: tl.constexpr = True, BAND: tl.constexpr = False, BG: tl.constexpr = 16, RUN: tl.constexpr = False,
                PICK: tl.constexpr = False):
    """RESID: also store ORES = out - round(out) (the output's rounding residual, in O's dtype).
    PRES: P V with P split in two half-precision parts (``p = round(p) + residual``: one more
    MMA), so the fp32 output is that of the fp32 probabilities. With both, the backward's
    ``delta = dO . O`` equals ``sum_j P dP`` to fp32 rounding: the rows of dS sum to ~0 as
    they must, which the encoding-parameter gradients (sums of dS) need.
    TABLE (T5, FIRE): tile scalars from the tile tables, loaded one tile ahead; key tiles from
    the first heavy one on (SPL) run in a second loop with runtime kink loops.
    BAND (T5, ``t5_band``): on a row whose ALN flag is set (every live score's distance is its index
    distance, ``_aligned_rows``) that second loop adds band tiles (``_band_tile``: BT, BD, NT, BG)
    instead of a gather per score; other rows keep the gather (a loop of their own, so the gather's
    registers and shared-memory staging stay out of the band loop).
    RUN / PICK (``run_mask``): a launch for the aligned rows masks with ``_run_mask`` (SEGLO: the
    queries' first keys), a second one the others with ``_mask`` (``_pick``; every kernel the same)."""
    pid_m = tl.program_id(0)
    scale2 = tl.cast(scale2, tl.float32)   # a launch from inductor's code passes Python floats as fp64
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    m0 = pid_m * BM
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    mrow = offs_m < Tq
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=mrow[:, None], other=0.0)
    qpos = tl.load(QP + b * qp_sb + offs_m, mask=mrow, other=0)
    qf = qpos.to(tl.float32)
    qlo = tl.load(QMIN + b * qp_sb + m0)
    rowf = qf * 0.0
    if BIAS == 5:
        rowf = tl.load(ROWF + b * qp_sb + offs_m, mask=mrow, other=0.0)
    sq = offs_m * 0
    if HAS_SEG:
        sq = tl.load(SQ + b * sq_sb + offs_m, mask=mrow, other=-1)
    aligned, rlo = _row_flags(ALN, SEGLO, b, tab_b, offs_m, mrow, Tq, HAS_SEG, BAND, RUN, PICK)
    if _pick(aligned, PICK, RUN):
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        lo, hi, split, kbase, vbase, tt, ta = _row_program(K, V, TT, TA, SPL, KST, b, h, hk, pid_m, m0, skb, skh, svb,
                                                           svh, tab_b, H, Tq, Tk, nqb, nkb, CAUSAL, HAS_SEG, TABLE,
                                                           BM, BN)
        rec_n, a2_n, d2_n = _tile_next(TABLE, tt, ta, tl.minimum(lo // BN, nkb - 1))
        for start_n in range(lo, split, BN):
            rec, a2, d2 = rec_n, a2_n, d2_n
            rec_n, a2_n, d2_n = _tile_next(TABLE, tt, ta, tl.minimum(start_n // BN + 1, nkb - 1))
            m_i, l_i, acc = _fwd_step(start_n, rec, a2, d2, q, qf, qpos, rowf, sq, offs_m, offs_d, m0, qlo, m_i, l_i,
                                      acc, kbase, vbase, KP, SK, KMAX, P0, P1, FT, IT, SC, b, h, skt, svt, kp_sb, sk_sb,
                                      H, W, NS, RT, Tq, Tk, scale2, BIAS, CAUSAL, HAS_SEG, USE_LOG, FAST, DOT_PREC,
                                      SKIP, PRES, TABLE, KU, False, BM, BN, BRANCHLESS, FOLD, None, RUN, rlo)
        if TABLE:
            if BAND and (aligned != 0):
                for start_n in range(split, hi, BN):
                    rec, a2, d2 = _tile_next(TABLE, tt, ta, start_n // BN)
                    band = _band_tile(BT, h, m0 - start_n + (Tk - Tq), BD, NT, BG, BM, BN)
                    m_i, l_i, acc = _fwd_step(start_n, rec, a2, d2, q, qf, qpos, rowf, sq, offs_m, offs_d, m0, qlo,
                                              m_i, l_i, acc, kbase, vbase, KP, SK, KMAX, P0, P1, FT, IT, SC, b, h, skt,
                                              svt, kp_sb, sk_sb, H, W, NS, RT, Tq, Tk, scale2, BIAS, CAUSAL, HAS_SEG,
                                              USE_LOG, FAST, DOT_PREC, SKIP, PRES, TABLE, KU, 2, BM, BN, BRANCHLESS,
                                              FOLD, band, RUN, rlo)
            else:
                for start_n in range(split, hi, BN):
                    rec, a2, d2 = _tile_next(TABLE, tt, ta, start_n // BN)
                    m_i, l_i, acc = _fwd_step(start_n, rec, a2, d2, q, qf, qpos, rowf, sq, offs_m, offs_d, m0, qlo,
                                              m_i, l_i, acc, kbase, vbase, KP, SK, KMAX, P0, P1, FT, IT, SC, b, h, skt,
                                              svt, kp_sb, sk_sb, H, W, NS, RT, Tq, Tk, scale2, BIAS, CAUSAL, HAS_SEG,
                                              USE_LOG, FAST, DOT_PREC, SKIP, PRES, TABLE, KU, 1, BM, BN, BRANCHLESS,
                                              FOLD, None, RUN, rlo)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(l_safe))
        out_r = out.to(O.dtype.element_ty)
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], out_r, mask=mrow[:, None])
        if RESID:
            tl.store(ORES + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
                     (out - out_r.to(tl.float32)).to(O.dtype.element_ty), mask=mrow[:, None])
        tl.store(LSE + bh * Tq + offs_m, lse, mask=mrow)


@triton.jit
def _bwd_delta_kernel(O, ORES, DO, DELTA, sob, sot, soh, sdob, sdot, sdoh, H, Tq,
                      RESID: tl.constexpr, D: tl.constexpr, BM: tl.constexpr):
    """delta[b, h, i] = sum_d dO O (O + its rounding residual with RESID), fp32, in one pass
    (no fp32 copies of O and dO in memory)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    mrow = offs_m < Tq
    po = b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :]
    o = tl.load(O + po, mask=mrow[:, None], other=0.0).to(tl.float32)
    if RESID:
        o += tl.load(ORES + po, mask=mrow[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=mrow[:, None],
                 other=0.0).to(tl.float32)
    tl.store(DELTA + bh * Tq + offs_m, tl.sum(o * do, 1), mask=mrow)


@triton.jit
def _dkdv_step(start_m, rec, a2, d2, k, v, kf, kpos, sk, offs_n, offs_d, n0, khi, dk, dv,
               Q, DO, LSE, DELTA, QP, SQ, QMIN, ROWF, P0, P1, FT, IT, SC, b, h, sqb, sqt, sqh, sdob, sdot, sdoh,
               qp_sb, sq_sb, H, W, NS, RT, Tq, Tk, scale2,
               BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, USE_LOG: tl.constexpr,
               FAST: tl.constexpr, DOT_PREC: tl.constexpr, SKIP: tl.constexpr, TABLE: tl.constexpr,
               KU: tl.constexpr, HEAVY: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               BRANCHLESS: tl.constexpr, FOLD: tl.constexpr = True, band=None, RUN: tl.constexpr = False,
               SEGLO=None):
    """One query tile of the dK/dV kernel (transposed scores [BN, BM]; ``band`` too)."""
    offs_m = start_m + tl.arange(0, BM)
    mrow = offs_m < Tq
    q, do, lse, delta, qpos = _query_tile(Q, DO, LSE, DELTA, QP, b, h, H, offs_m, mrow, offs_d, sqb, sqt, sqh, sdob,
                                          sdot, sdoh, qp_sb, Tq)
    s_lo = rec & 4095
    s_hi = (rec >> 12) & 4095
    sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale2  # [BN, BM]
    if BIAS != 0:
        rowf = _query_rowf(ROWF, b, qp_sb, offs_m, mrow, qpos, BIAS)
        sT, _rf, _lg = _add_bias(BIAS, sT, h, qpos.to(tl.float32)[None, :], kf[:, None], rowf[None, :],
                                 s_lo, s_hi, a2, d2, P0, P1, FT, IT, SC, H, W, NS, RT, CAUSAL, USE_LOG, FAST, KU,
                                 HEAVY, BRANCHLESS, band)
    pT = tl.math.exp2(sT - lse[None, :])
    if _col_need(rec, QMIN, b, qp_sb, start_m, n0, khi, Tq, Tk, CAUSAL, HAS_SEG, SKIP, TABLE, BM, BN):
        pT = _mask_cols_tile(pT, 0.0, SQ, SEGLO, b, sq_sb, offs_m, mrow, offs_n, qpos, kpos, sk, Tq, Tk, CAUSAL,
                             HAS_SEG, FOLD and (BIAS != 0) and (BIAS != 5), True, RUN)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, DKP, DVP, LSE, DELTA, QP, KP, SQ, SK, QMIN, KMAX,
                     P0, P1, FT, IT, SC, ROWF, TT, TA, SPC, QEN, BT, ALN, SEGLO,
                     sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
                     qp_sb, kp_sb, sq_sb, sk_sb, tab_b,
                     H, HKV, GROUP, Tq, Tk, W, NS, RT, nqb, nkb, scale2, scale, BD, NT,
                     BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
                     USE_LOG: tl.constexpr, FAST: tl.constexpr, DOT_PREC: tl.constexpr, SKIP: tl.constexpr,
                     TABLE: tl.constexpr, KU: tl.constexpr,
                     D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BRANCHLESS: tl.constexpr = True,
                     FOLD: tl.constexpr = True, PHASE: tl.constexpr = 0, BAND: tl.constexpr = False,
                     BG: tl.constexpr = 16, RUN: tl.constexpr = False, PICK: tl.constexpr = False):
    """One program per (key block, batch, kv head): dK, dV summed over the GQA group.
    TABLE: query tiles before SPC (the heavy ones, next to the diagonal) run in a first loop
    with runtime kink loops, the rest in the software-pipelined loop.
    PHASE (``split_heavy``): 0 both loops; 1 the light loop only, into fp32 DK / DV; 2 the heavy
    loop only, adding the phase-1 partials DKP / DVP (same strides) before the store. A kernel
    without the runtime loops keeps its wgmma pipelined (ptxas serializes every wgmma of a
    function with such a loop: docs/kernels.md).
    BAND (T5): the heavy loop of an aligned row adds band tiles, from a table built transposed
    (``_band_table``), in the transposed scores' shape."""
    pid_n = tl.program_id(0)
    scale2, scale = tl.cast(scale2, tl.float32), tl.cast(scale, tl.float32)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    n0 = pid_n * BN
    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    mcol = offs_n < Tk
    k, v, kpos, kf, khi, sk, lo, split, end = _col_program(
        K, V, KP, KMAX, SK, QEN, SPC, b, hk, pid_n, n0, offs_n, offs_d, mcol, skb, skt, skh, svb, svt, svh, kp_sb,
        sk_sb, tab_b, Tq, Tk, nkb, CAUSAL, HAS_SEG, TABLE, BM, BN)
    bt = b * tab_b
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    aligned, seglo = _col_flags(ALN, SEGLO, bt, Tq, BAND, PICK)
    if _pick(aligned, PICK, RUN):
        for hh in range(0, GROUP):
            h = hk * GROUP + hh
            tt, ta = _col_tables(TT, TA, bt, h, H, nqb, nkb, pid_n)
            if TABLE and (PHASE != 1):
                if BAND and (aligned != 0):
                    for start_m in range(lo, split, BM):
                        rec, a2, d2 = _tile_next(TABLE, tt, ta, (start_m // BM) * nkb)
                        band = _band_tile(BT, h, start_m - n0 + (Tk - Tq), BD, NT, BG, BN, BM)
                        dk, dv = _dkdv_step(start_m, rec, a2, d2, k, v, kf, kpos, sk, offs_n, offs_d, n0, khi, dk, dv,
                                            Q, DO, LSE, DELTA, QP, SQ, QMIN, ROWF, P0, P1, FT, IT, SC, b, h, sqb, sqt,
                                            sqh, sdob, sdot, sdoh, qp_sb, sq_sb, H, W, NS, RT, Tq, Tk, scale2, BIAS,
                                            CAUSAL, HAS_SEG, USE_LOG, FAST, DOT_PREC, SKIP, TABLE, KU, 2, BM, BN,
                                            BRANCHLESS, FOLD, band, RUN, seglo)
                else:
                    for start_m in range(lo, split, BM):
                        rec, a2, d2 = _tile_next(TABLE, tt, ta, (start_m // BM) * nkb)
                        dk, dv = _dkdv_step(start_m, rec, a2, d2, k, v, kf, kpos, sk, offs_n, offs_d, n0, khi, dk, dv,
                                            Q, DO, LSE, DELTA, QP, SQ, QMIN, ROWF, P0, P1, FT, IT, SC, b, h, sqb, sqt,
                                            sqh, sdob, sdot, sdoh, qp_sb, sq_sb, H, W, NS, RT, Tq, Tk, scale2, BIAS,
                                            CAUSAL, HAS_SEG, USE_LOG, FAST, DOT_PREC, SKIP, TABLE, KU, 1, BM, BN,
                                            BRANCHLESS, FOLD, None, RUN, seglo)
            if PHASE != 2:
                rec_n, a2_n, d2_n = _tile_next(TABLE, tt, ta, tl.minimum(split // BM, nqb - 1) * nkb)
                for start_m in range(split, end, BM):
                    rec, a2, d2 = rec_n, a2_n, d2_n
                    rec_n, a2_n, d2_n = _tile_next(TABLE, tt, ta, tl.minimum(start_m // BM + 1, nqb - 1) * nkb)
                    dk, dv = _dkdv_step(start_m, rec, a2, d2, k, v, kf, kpos, sk, offs_n, offs_d, n0, khi, dk, dv,
                                        Q, DO, LSE, DELTA, QP, SQ, QMIN, ROWF, P0, P1, FT, IT, SC, b, h, sqb, sqt, sqh,
                                        sdob, sdot, sdoh, qp_sb, sq_sb, H, W, NS, RT, Tq, Tk, scale2, BIAS, CAUSAL,
                                        HAS_SEG, USE_LOG, FAST, DOT_PREC, SKIP, TABLE, KU, False, BM, BN, BRANCHLESS,
                                        FOLD, None, RUN, seglo)
        dk = dk * scale
        if PHASE == 2:
            dk += tl.load(DKP + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=mcol[:, None],
                          other=0.0)
            dv += tl.load(DVP + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], mask=mcol[:, None],
                          other=0.0)
        _store_dkdv(DK, DV, dk, dv, b, hk, offs_n, offs_d, mcol, skb, skt, skh, svb, svt, svh)


@triton.jit
def _add_at(row, idx, val, NSP: tl.constexpr):
    """``row[idx] += val`` (atomic) for a data-dependent ``idx`` in [0, NSP): one lane of a static
    range, selected by the mask. The address is then ``row + arange``: inductor's analysis of a
    traced launch (megafire::fused_bias_attention) follows an address back to the arguments it
    is computed from, through loop-carried values to every input (it would take K, V and the
    tables as written, and clone them or refuse leaf inputs); a mask it does not follow.
    ``sem="relaxed"``: the sums are read only by later launches (stream order), never inside this one,
    so the atomic needs no ordering; Triton's default (acq_rel) put a ``MEMBAR.ALL.GPU`` (wait until every
    earlier memory operation of the thread is visible GPU-wide) before each one and a ``CCTL.IVALL`` (drop
    the whole L1) after, inside the tile loops of FIRE's and T5's backward (sm_90a SASS)."""
    lanes = tl.arange(0, NSP)
    tl.atomic_add(row + lanes, tl.zeros([NSP], tl.float32) + val, mask=lanes == idx, sem="relaxed")


@triton.jit
def _add_pair(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _sum_pair(a, b):
    """``(tl.sum(a, 0), tl.sum(b, 0))`` of two [BM] row vectors in one reduction: the sum across the
    program's warps goes through shared memory once, with one pair of barriers instead of two. Each
    operand is combined as ``tl.sum`` would combine it alone on the GPU; the interpreter's order differs
    in the last bits (FIRE's parameter gradients 2.6e-6 apart in a test; docs/kernels.md "Session 9")."""
    return tl.reduce((a, b), 0, _add_pair)


@triton.jit
def _dq_step(start_n, rec, a2, d2, q, do, lse, delta, qf, qpos, rowf, sq, offs_m, offs_d, m0, qlo, c, part,
             dq, acc1, acc2, runP, runQ, cur, gacc,
             kbase, vbase, KP, SK, KMAX, P0, P1, FT, IT, SC, b, h, skt, svt, kp_sb, sk_sb,
             H, W, NS, RT, Tq, Tk, scale2,
             BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, USE_LOG: tl.constexpr,
             FAST: tl.constexpr, DOT_PREC: tl.constexpr, SKIP: tl.constexpr, PGRAD: tl.constexpr,
             TABLE: tl.constexpr, KU: tl.constexpr, HEAVY: tl.constexpr, NSP: tl.constexpr, BM: tl.constexpr,
             BN: tl.constexpr, DEFER: tl.constexpr = False, RCP_EX2: tl.constexpr = False,
             FOLD: tl.constexpr = True, scr=None, DIAG: tl.constexpr = False, RTP: tl.constexpr = 16,
             W2: tl.constexpr = 16, band=None, RUN: tl.constexpr = False, rlo=None):
    """One key tile of the dQ kernel: dQ and the encoding-parameter sums (see _bwd_dq_kernel).
    gacc (T5, DEFER, heavy tiles): [BM, NSP] per-row sums per bucket boundary, reduced over rows
    once after the heavy loop; elsewhere passed through untouched."""
    offs_n, mcol, k, v, kpos, s_lo, s_hi = _key_tile(start_n, rec, kbase, vbase, KP, b, kp_sb, skt, svt, offs_d,
                                                     Tk, BN)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale2
    s, rf, lg = _add_bias(BIAS, s, h, qf[:, None], kpos.to(tl.float32)[None, :], rowf[:, None],
                          s_lo, s_hi, a2, d2, P0, P1, FT, IT, SC, H, W, NS, RT, CAUSAL, USE_LOG, FAST, KU, HEAVY,
                          False, band)
    p = tl.math.exp2(s - lse[:, None])
    p = _mask_rows_tile(p, 0.0, rec, KMAX, SK, b, kp_sb, sk_sb, start_n, offs_n, mcol, offs_m, qpos, kpos,
                        sq, m0, qlo, Tq, Tk, CAUSAL, HAS_SEG, SKIP, TABLE, BM, BN, FOLD, RUN, rlo)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    if PGRAD:
        acc1, acc2, runP, runQ, cur, gacc = _pgrad_tile(ds, rf, lg, rowf, a2, s_lo, s_hi, h, c, part, acc1, acc2,
                                                        runP, runQ, cur, gacc, P1, FT, IT, H, W, NS, RT, BIAS,
                                                        USE_LOG, KU, HEAVY, NSP, DEFER, RCP_EX2,
                                                        m0 - start_n + (Tk - Tq), scr, DIAG, RTP, W2, BM, BN)
    return dq, acc1, acc2, runP, runQ, cur, gacc


@triton.jit
def _pgrad_tile(ds, rf, lg, rowf, a2, s_lo, s_hi, h, c, part, acc1, acc2, runP, runQ, cur, gacc, P1, FT, IT,
                H, W, NS, RT, BIAS: tl.constexpr, USE_LOG: tl.constexpr, KU: tl.constexpr, HEAVY: tl.constexpr,
                NSP: tl.constexpr, DEFER: tl.constexpr, RCP_EX2: tl.constexpr, doff, scr, DIAG: tl.constexpr,
                RTP: tl.constexpr, W2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """The encoding-parameter sums of one [BM, BN] tile of dS (query rows x key columns), shared by
    the dq and the one-pass kernels: per-row accumulators ``acc1`` / ``acc2`` (Kerple: summed over
    the program; FIRE: the rows' ``c`` and denominator sums), the current segment / bucket's
    running row sums ``runP`` / ``runQ`` (flushed to ``part`` when the tile's segment changes),
    and the per-kink / per-boundary sums (to ``part``; T5 with DEFER and HEAVY: row partials in
    ``gacc``; T5 with DIAG and HEAVY: ``gacc`` [RTP] per-distance sums, see ``_t5_diagonals``; ``doff``
    the tile's ``i - j`` at its first row and column, ``scr`` the program's scratch). Returns the
    updated (acc1, acc2, runP, runQ, cur, gacc). RCP_EX2: see ``_dlog_dc``."""
    if BIAS == 2:
        r2 = tl.load(P1 + h)
        acc1 += tl.sum(ds * lg, 1)
        acc2 += tl.sum(ds * _dlog_dc(rf, lg, r2, RCP_EX2), 1)
    elif BIAS == 3:
        r2 = tl.load(P1 + h)
        pw = tl.math.exp2(r2 * lg)
        dpw = ds * pw
        acc1 += tl.sum(dpw, 1)
        acc2 += tl.sum(dpw * tl.maximum(lg, 0.0), 1)  # lg = -inf at d = 0 (see _add_bias), where dpw = 0
    elif BIAS == 5:
        rowP = tl.sum(ds, 1)
        x = lg * rowf[:, None]
        rowQ = tl.sum(ds * lg, 1) * rowf
        a = a2 * 0.6931471805599453
        dsd = ds
        if USE_LOG:
            dsd = ds * _dlog_dc(rf, lg, c, RCP_EX2)
            acc1 += a * tl.sum(dsd, 1)
        acc2 += a * rowQ
        runP, runQ, cur = _run_sums(rowP, rowQ, s_lo, part, runP, runQ, cur, NS, NSP, True)
        if HEAVY:
            for t in range(s_lo, s_hi):
                acc1, acc2 = _fire_kink_grad(t, h, ds, x, dsd, acc1, acc2, part, FT, H, W, NS, USE_LOG, NSP)
        else:
            if s_hi > s_lo:
                for u in tl.static_range(KU):
                    if s_lo + u < s_hi:
                        acc1, acc2 = _fire_kink_grad(s_lo + u, h, ds, x, dsd, acc1, acc2, part, FT, H, W, NS,
                                                     USE_LOG, NSP)
    elif BIAS == 4:
        if (HEAVY == 2) and DIAG:
            # an aligned row (t5_band): every tile is aligned, no per-tile check
            gacc = _t5_diagonals(ds, doff, RT, scr, gacc, BM, BN, RTP, W2)
        elif HEAVY and DIAG:
            # T5 next to the diagonal: where every live score's distance is its index distance
            # (positions contiguous inside each document: packed rows, plain rows), the tile's dS
            # goes to per-distance sums by diagonal (``_t5_diagonals``), O(1) per score instead of
            # one masked row sum per bucket boundary (~20 here); other tiles take the boundary loop
            dd = doff + tl.arange(0, BM)[:, None] - tl.arange(0, BN)[None, :]       # [BM, BN] index distance
            same = tl.minimum(rf, RT * 1.0) == tl.minimum(tl.maximum(dd, 0), RT).to(tl.float32)
            aligned = tl.min(tl.min(tl.where(same | (ds == 0.0), 1, 0), 1), 0)   # masked scores: dS = 0
            if aligned == 1:
                gacc = _t5_diagonals(ds, doff, RT, scr, gacc, BM, BN, RTP, W2)
            else:
                # the boundary loop below, repeated: one shared runtime branch for both made the one-pass
                # kernel's light tile loop 15 SASS instructions longer (bench resources --sass)
                runP, runQ, cur = _run_sums(tl.sum(ds, 1), runQ, s_lo, part, runP, runQ, cur, NS, NSP, False)
                for kk in range(s_lo + 1, s_hi + 1):
                    _t5_boundary_grad(kk, ds, rf, part, IT, NS, RT, NSP)
        else:
            runP, runQ, cur = _run_sums(tl.sum(ds, 1), runQ, s_lo, part, runP, runQ, cur, NS, NSP, False)
            if HEAVY:
                if DEFER:
                    # per boundary a row sum only (in-warp); the rows' cross-warp sum and the
                    # atomic run once per program instead of once per boundary (~50 per row
                    # program next to the diagonal at 64x64 tiles)
                    lanes = tl.arange(0, NSP)
                    for kk in range(s_lo + 1, s_hi + 1):
                        rs = _t5_boundary_rows(kk, ds, rf, IT, RT)
                        gacc += tl.where(lanes[None, :] == kk, rs[:, None], 0.0)
                else:
                    for kk in range(s_lo + 1, s_hi + 1):
                        _t5_boundary_grad(kk, ds, rf, part, IT, NS, RT, NSP)
            else:
                if s_hi > s_lo:
                    for u in tl.static_range(1, KU):
                        if s_lo + u <= s_hi:
                            _t5_boundary_grad(s_lo + u, ds, rf, part, IT, NS, RT, NSP)
    return acc1, acc2, runP, runQ, cur, gacc


@triton.jit
def _heavy_sums(part, gacc, NS, RT, PGRAD: tl.constexpr, BIAS: tl.constexpr, DIAG: tl.constexpr, DEFER: tl.constexpr,
                RTP: tl.constexpr, NSP: tl.constexpr):
    """After a program's heavy T5 loop: DIAG's per-distance sums ``gacc`` [RTP] to PART ``[2 NS, 2 NS + RT]``,
    or DEFER's per-boundary row partials ``gacc`` [BM, NSP] reduced once and added to ``G``."""
    if DIAG and PGRAD and (BIAS == 4):
        lanes = tl.arange(0, RTP)
        tl.store(part + 2 * NS + lanes, gacc, mask=lanes <= RT)
    elif DEFER and PGRAD and (BIAS == 4):
        lanes = tl.arange(0, NSP)
        tl.atomic_add(part + NS + lanes, tl.sum(gacc, 0), mask=lanes < NS, sem="relaxed")


@triton.jit
def _program_sums(part, acc1, acc2, runP, runQ, cur, NS, BIAS: tl.constexpr, NSP: tl.constexpr):
    """A program's last parameter sums: Kerple's two row accumulators, T5 / FIRE's running sums of the
    current bucket / segment (``_run_sums``)."""
    if (BIAS == 2) | (BIAS == 3):
        s1, s2 = _sum_pair(acc1, acc2)
        tl.store(part, s1)
        tl.store(part + 1, s2)
    elif BIAS == 5:
        sp, sq = _sum_pair(runP, runQ)
        _add_at(part, tl.maximum(cur, 0), sp, NSP)
        _add_at(part + NS, tl.maximum(cur, 0), sq, NSP)
    elif BIAS == 4:
        _add_at(part, tl.maximum(cur, 0), tl.sum(runP, 0), NSP)


@triton.jit
def _run_sums(rowP, rowQ, s_lo, part, runP, runQ, cur, NS, NSP: tl.constexpr, Q: tl.constexpr):
    """Adds a tile's row sums to the running sums of segment / bucket ``s_lo``, first flushing those
    of the previous one (``cur``) to ``part`` (P at ``[0, NS)``, Q at ``[NS, 2 NS)``)."""
    if s_lo != cur:
        if Q:
            sp, sq = _sum_pair(runP, runQ)
            _add_at(part, tl.maximum(cur, 0), sp, NSP)
            _add_at(part + NS, tl.maximum(cur, 0), sq, NSP)
            runQ = runQ * 0.0
        else:
            _add_at(part, tl.maximum(cur, 0), tl.sum(runP, 0), NSP)
        runP = runP * 0.0
        cur = s_lo
    runP += rowP
    if Q:
        runQ += rowQ
    return runP, runQ, cur


@triton.jit
def _t5_diagonals(ds, doff, RT, scr, dacc, BM: tl.constexpr, BN: tl.constexpr, RTP: tl.constexpr,
                  W2: tl.constexpr):
    """T5, a tile whose live scores have distance ``clamp(i - j + doff, 0, RT)`` (i, j the tile's row
    and column): ``dacc[r] +=`` the sum of dS over the scores of distance r (lanes [0, RT]).

    ``D[e] = sum_i dS[i, i + e - (BM - 1)]``, e in [0, BM + BN - 1) (diagonal e holds the scores of
    index distance ``i - j = BM - 1 - e``, from BM - 1 down to 1 - BN: the offset is the tile's
    height, not its width, or a tile taller than wide loses its lowest diagonals): the tile goes
    through this program's scratch ``scr`` (BM BN + W2 fp32) and comes back skewed, so one column
    sum per diagonal replaces one masked sum per bucket boundary. The skewed read runs along e in
    memory order, so the compiler lays e across the threads and each thread sums its diagonals'
    rows in registers. Diagonal e has distance ``doff + BM - 1 - e``; those at or below 0 go to
    lane 0, at or above RT to lane RT, the rest (distinct) each to its own lane: a read back from
    the scratch (the shift is data-dependent; registers cannot be indexed by it). Store addresses
    are the program's scratch plus static offsets only (see ``_add_at``)."""
    rows = tl.arange(0, BM)
    cols = tl.arange(0, BN)
    diag = tl.arange(0, W2)
    tl.debug_barrier()   # the previous tile's reads of the scratch are done
    tl.store(scr + rows[:, None] * BN + cols[None, :], ds)
    tl.debug_barrier()
    jj = rows[:, None] + diag[None, :] - (BM - 1)                                # [BM, W2] column of (i, e)
    sk = tl.load(scr + rows[:, None] * BN + jj, mask=(jj >= 0) & (jj < BN), other=0.0)
    dsum = tl.sum(sk, 0)                                                          # [W2] per diagonal
    tl.store(scr + BM * BN + diag, dsum)
    tl.debug_barrier()
    rd = doff + (BM - 1) - diag               # distance of diagonal e
    lanes = tl.arange(0, RTP)
    src = doff + (BM - 1) - lanes
    mid = (lanes > 0) & (lanes < RT) & (src >= 0) & (src < BM + BN - 1)
    add = tl.load(scr + BM * BN + src, mask=mid, other=0.0)
    lo = tl.sum(tl.where(rd <= 0, dsum, 0.0), 0)
    hi = tl.sum(tl.where(rd >= RT, dsum, 0.0), 0)
    return dacc + add + tl.where(lanes == 0, lo, 0.0) + tl.where(lanes == RT, hi, 0.0)


@triton.jit
def _fire_kink_grad(t, h, ds, x, dsd, acc1, acc2, part, FT, H, W, NS, USE_LOG: tl.constexpr, NSP: tl.constexpr):
    """Sums over the scores past kink t (x > kink_t) of a tile: dS and dS x to G[t] / GQ[t];
    the slope jump's share of the per-row c and denominator sums."""
    kt = tl.load(FT + 2 * H * NS + H * W + t)
    da = tl.load(FT + 2 * H * NS + h * W + t) * 0.6931471805599453
    on = x > kt
    dsm = tl.where(on, ds, 0.0)
    rq = tl.sum(dsm * x, 1)
    sp, sq = _sum_pair(tl.sum(dsm, 1), rq)
    _add_at(part + 2 * NS, t, sp, NSP)
    _add_at(part + 2 * NS + W, t, sq, NSP)
    acc2 += da * rq
    if USE_LOG:
        acc1 += da * tl.sum(tl.where(on, dsd, 0.0), 1)
    return acc1, acc2


@triton.jit
def _t5_boundary_rows(kk, ds, rf, IT, RT):
    """T5: per row of a tile, the sum of dS where r >= T_kk (first distance of bucket kk)."""
    thr = tl.load(IT + RT + 1 + kk).to(tl.float32)
    return tl.sum(tl.where(rf >= thr, ds, 0.0), 1)


@triton.jit
def _t5_boundary_grad(kk, ds, rf, part, IT, NS, RT, NSP: tl.constexpr):
    """T5: the sum of a tile's dS with r >= T_kk to G[kk]."""
    _add_at(part + NS, kk, tl.sum(_t5_boundary_rows(kk, ds, rf, IT, RT), 0), NSP)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, DQP, LSE, DELTA, QP, KP, SQ, SK, QMIN, KMAX,
                   P0, P1, FT, IT, SC, ROWF, TT, TA, SPL, KST, PART, ROWC, ROWX, SCR, BT, ALN, SEGLO,
                   sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
                   qp_sb, kp_sb, sq_sb, sk_sb, tab_b,
                   H, GROUP, Tq, Tk, W, NS, RT, nqb, nkb, scale2, scale, part_stride, BD, NT,
                   BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
                   USE_LOG: tl.constexpr, FAST: tl.constexpr, DOT_PREC: tl.constexpr, SKIP: tl.constexpr,
                   PGRAD: tl.constexpr, TABLE: tl.constexpr, KU: tl.constexpr,
                   D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NSP: tl.constexpr = 16,
                   DEFER: tl.constexpr = False, RCP_EX2: tl.constexpr = False, FOLD: tl.constexpr = True,
                   PHASE: tl.constexpr = 0, DIAG: tl.constexpr = False, RTP: tl.constexpr = 16,
                   W2: tl.constexpr = 16, BAND: tl.constexpr = False, BG: tl.constexpr = 16, RUN: tl.constexpr = False,
                PICK: tl.constexpr = False):
    """One program per (query block, batch, head): dQ and the bias-parameter partial sums.

    PART row of this program (fp32, zeroed by the caller):
    Kerple ``[0]`` sum dS lg (log) / dS pw (power), ``[1]`` sum dS r/(1 + r2 r) / dS pw lg2 r;
    T5 ``[0, NS)`` per-bucket base sums, ``[NS, 2 NS)`` per-boundary sums ``G``;
    FIRE ``[0, NS)`` P, ``[NS, 2 NS)`` Q per segment, ``[2 NS, 2 NS + W)`` G,
    ``[2 NS + W, 2 NS + 2 W)`` GQ per kink. FIRE also writes per row (ROWC, ROWX [B H, Tq]):
    ``sum_j dS f'(x) r / (1 + c r)`` and ``sum_j dS f'(x) x``.
    Light tiles (at most KU kinks / boundaries): unrolled guarded blocks in the
    software-pipelined loop; from the first heavy tile on (SPL): a second loop.
    NSP: a power of two >= NS, the lanes of ``_add_at`` (the sums at data-dependent indices).
    DEFER (T5): the heavy loop keeps its per-boundary sums as [BM, NSP] row partials and adds
    them to ``G`` after the loop (one cross-row reduction), not per boundary and tile.
    DIAG (T5): the heavy tiles' per-distance sums instead where the tile's distances are its index
    distances (``_t5_diagonals``; scratch SCR, BM BN + W2 fp32 per program) to ``[2 NS, 2 NS + RT]``.
    PHASE (``split_heavy``, T5 / FIRE): 0 both loops; 1 the light loop only, dQ into the fp32 DQ;
    2 the heavy loop only, adding the phase-1 dQ (DQP, same strides) and FIRE's phase-1 row sums
    (read back from ROWC / ROWX); PART rows take both phases' sums (atomics).
    BAND (T5): the heavy loop of an aligned row adds band tiles (see ``_fwd_kernel``; with DIAG no
    per-tile alignment check).
    """
    pid_m = tl.program_id(0)
    scale2, scale = tl.cast(scale2, tl.float32), tl.cast(scale, tl.float32)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    m0 = pid_m * BM
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    mrow = offs_m < Tq
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=mrow[:, None], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=mrow[:, None], other=0.0)
    lse = tl.load(LSE + bh * Tq + offs_m, mask=mrow, other=float("inf"))
    delta = tl.load(DELTA + bh * Tq + offs_m, mask=mrow, other=0.0)
    qpos = tl.load(QP + b * qp_sb + offs_m, mask=mrow, other=0)
    qf = qpos.to(tl.float32)
    qlo = tl.load(QMIN + b * qp_sb + m0)
    rowf = qf * 0.0
    if BIAS == 5:
        rowf = tl.load(ROWF + b * qp_sb + offs_m, mask=mrow, other=0.0)
    sq = offs_m * 0
    if HAS_SEG:
        sq = tl.load(SQ + b * sq_sb + offs_m, mask=mrow, other=-1)
    aligned, rlo = _row_flags(ALN, SEGLO, b, tab_b, offs_m, mrow, Tq, HAS_SEG, BAND, RUN, PICK)
    if _pick(aligned, PICK, RUN):
        part = PART + (bh * tl.num_programs(0) + pid_m) * part_stride
        scr = SCR + (bh * tl.num_programs(0) + pid_m) * (BM * BN + W2)
        dq = tl.zeros([BM, D], tl.float32)
        acc1 = tl.zeros([BM], tl.float32)  # kerple / FIRE row sums
        acc2 = tl.zeros([BM], tl.float32)
        runP = tl.zeros([BM], tl.float32)  # T5 / FIRE: running sums of the current segment / bucket
        runQ = tl.zeros([BM], tl.float32)
        cur = qlo * 0 - 1
        c = 0.0
        if BIAS == 5:
            c = tl.load(SC)
        lo, hi, split, kbase, vbase, tt, ta = _row_program(K, V, TT, TA, SPL, KST, b, h, hk, pid_m, m0, skb, skh, svb,
                                                           svh, tab_b, H, Tq, Tk, nqb, nkb, CAUSAL, HAS_SEG, TABLE,
                                                           BM, BN)
        rec_n, a2_n, d2_n = _tile_next(TABLE, tt, ta, tl.minimum(lo // BN, nkb - 1))
        nogacc = 0.0
        if PHASE != 2:
            for start_n in range(lo, split, BN):
                rec, a2, d2 = rec_n, a2_n, d2_n
                rec_n, a2_n, d2_n = _tile_next(TABLE, tt, ta, tl.minimum(start_n // BN + 1, nkb - 1))
                dq, acc1, acc2, runP, runQ, cur, nogacc = _dq_step(
                    start_n, rec, a2, d2, q, do, lse, delta, qf, qpos, rowf, sq, offs_m, offs_d, m0, qlo, c, part,
                    dq, acc1, acc2, runP, runQ, cur, nogacc, kbase, vbase, KP, SK, KMAX, P0, P1, FT, IT, SC, b, h, skt,
                    svt, kp_sb, sk_sb, H, W, NS, RT, Tq, Tk, scale2, BIAS, CAUSAL, HAS_SEG, USE_LOG, FAST, DOT_PREC,
                    SKIP, PGRAD, TABLE, KU, False, NSP, BM, BN, False, RCP_EX2, FOLD, scr, False, RTP, W2, None,
                    RUN, rlo)
        if TABLE and (PHASE != 1):
            gacc = nogacc
            if DIAG and PGRAD and (BIAS == 4):
                gacc = tl.zeros([RTP], tl.float32)
            elif DEFER and PGRAD and (BIAS == 4):
                gacc = tl.zeros([BM, NSP], tl.float32)
            if BAND and (aligned != 0):
                for start_n in range(split, hi, BN):
                    rec, a2, d2 = _tile_next(TABLE, tt, ta, start_n // BN)
                    band = _band_tile(BT, h, m0 - start_n + (Tk - Tq), BD, NT, BG, BM, BN)
                    dq, acc1, acc2, runP, runQ, cur, gacc = _dq_step(
                        start_n, rec, a2, d2, q, do, lse, delta, qf, qpos, rowf, sq, offs_m, offs_d, m0, qlo, c, part,
                        dq, acc1, acc2, runP, runQ, cur, gacc, kbase, vbase, KP, SK, KMAX, P0, P1, FT, IT, SC, b, h,
                        skt, svt, kp_sb, sk_sb, H, W, NS, RT, Tq, Tk, scale2, BIAS, CAUSAL, HAS_SEG, USE_LOG, FAST,
                        DOT_PREC, SKIP, PGRAD, TABLE, KU, 2, NSP, BM, BN, DEFER, RCP_EX2, FOLD, scr, DIAG, RTP, W2,
                        band, RUN, rlo)
            else:
                for start_n in range(split, hi, BN):
                    rec, a2, d2 = _tile_next(TABLE, tt, ta, start_n // BN)
                    dq, acc1, acc2, runP, runQ, cur, gacc = _dq_step(
                        start_n, rec, a2, d2, q, do, lse, delta, qf, qpos, rowf, sq, offs_m, offs_d, m0, qlo, c, part,
                        dq, acc1, acc2, runP, runQ, cur, gacc, kbase, vbase, KP, SK, KMAX, P0, P1, FT, IT, SC, b, h,
                        skt, svt, kp_sb, sk_sb, H, W, NS, RT, Tq, Tk, scale2, BIAS, CAUSAL, HAS_SEG, USE_LOG, FAST,
                        DOT_PREC, SKIP, PGRAD, TABLE, KU, 1, NSP, BM, BN, DEFER, RCP_EX2, FOLD, scr, DIAG, RTP, W2,
                        None, RUN, rlo)
            _heavy_sums(part, gacc, NS, RT, PGRAD, BIAS, DIAG, DEFER, RTP, NSP)
        dq = dq * scale
        dq_off = b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :]   # DQ and DQP: q's strides
        if PHASE == 2:
            dq += tl.load(DQP + dq_off, mask=mrow[:, None], other=0.0)
        tl.store(DQ + dq_off, dq.to(DQ.dtype.element_ty), mask=mrow[:, None])
        if PGRAD:
            _program_sums(part, acc1, acc2, runP, runQ, cur, NS, BIAS, NSP)
            if BIAS == 5:
                if PHASE == 2:
                    acc1 += tl.load(ROWC + bh * Tq + offs_m, mask=mrow, other=0.0)
                    acc2 += tl.load(ROWX + bh * Tq + offs_m, mask=mrow, other=0.0)
                tl.store(ROWC + bh * Tq + offs_m, acc1, mask=mrow)
                tl.store(ROWX + bh * Tq + offs_m, acc2, mask=mrow)
