"""Triton kernel of the fused rotary embedding (maths and launch: ``rotary_triton.py``).

Imported only by ``rotary_triton`` and only when the fused path runs: ``@triton.jit`` decides
at decoration time whether the kernel is compiled or interpreted (``TRITON_INTERPRET=1``), so
``rotary_triton`` reloads this module when that flag has changed since it was imported.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not INTERPRET:
    from triton.language.extra import libdevice


@triton.jit
def _cos_sin(angle, PRECISE: tl.constexpr):
    # libdevice's cosf/sinf (full range reduction: angles reach p * w_0 = p), named explicitly:
    # what torch's CUDA cos/sin compute, whatever tl.cos lowers to (Triton 3.6: the same PTX).
    # The interpreter has no libdevice: numpy's cos/sin there.
    if PRECISE:
        cos, sin = libdevice.cos(angle), libdevice.sin(angle)
    else:
        cos, sin = tl.cos(angle), tl.sin(angle)
    return cos, sin


@triton.jit
def _rotate_rows(x_ptr, out_ptr, pos_ptr, inv_freq_ptr, scale, row_start, num_rows, seq_len,
                 stride_xb, stride_xt, stride_xh, stride_pb, stride_pt, NUM_HEADS: tl.constexpr,
                 HALF: tl.constexpr, TAIL: tl.constexpr, INVERSE: tl.constexpr, PRECISE: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    """Rows ``[row_start, row_start + BLOCK_T)`` of x viewed as [B*T, H, D] -> out (contiguous [B*T, H, D]).

    out[:HALF] = x1 c - x2 s, out[HALF:2 HALF] = x2 c + x1 s with c, s = a cos, a sin of p * w
    (INVERSE: s -> -s, the transpose: the backward); channels [2 HALF, D) are copied.
    """
    rows = row_start + tl.arange(0, BLOCK_T).to(tl.int64)               # [BT] token index b * T + t
    row_ok = rows < num_rows
    b, t = rows // seq_len, rows % seq_len
    pos = tl.load(pos_ptr + b * stride_pb + t * stride_pt, mask=row_ok, other=0).to(tl.float32)
    f = tl.arange(0, BLOCK_HALF)
    f_ok = f < HALF
    inv_freq = tl.load(inv_freq_ptr + f, mask=f_ok, other=0.0)
    cos, sin = _cos_sin(pos[:, None] * inv_freq[None, :], PRECISE)      # [BT, BHALF] fp32, as torch: p * w
    cos, sin = cos * scale, sin * scale                                  # attention factor (YaRN), then rotate
    if INVERSE:
        sin = -sin
    cos, sin = cos[:, None, :], sin[:, None, :]                          # [BT, 1, BHALF]
    x_row = x_ptr + b * stride_xb + t * stride_xt                        # [BT] pointers
    HEAD_DIM: tl.constexpr = 2 * HALF + TAIL
    out_row = out_ptr + rows * (NUM_HEADS * HEAD_DIM)
    for h0 in tl.static_range(0, NUM_HEADS, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        rh_ok = row_ok[:, None, None] & (h < NUM_HEADS)[None, :, None]   # [BT, BH, 1]
        x1_ptr = x_row[:, None, None] + h[None, :, None] * stride_xh + f[None, None, :]   # [BT, BH, BHALF]
        o1_ptr = out_row[:, None, None] + h[None, :, None] * HEAD_DIM + f[None, None, :]
        mask = rh_ok & f_ok[None, None, :]
        x1 = tl.load(x1_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x1_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(o1_ptr, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o1_ptr + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)
        if TAIL > 0:   # partial rotary: the channels beyond rotary_dim pass through
            c = 2 * HALF + tl.arange(0, BLOCK_TAIL)
            tail_mask = rh_ok & (c < 2 * HALF + TAIL)[None, None, :]
            rest = tl.load(x_row[:, None, None] + h[None, :, None] * stride_xh + c[None, None, :],
                           mask=tail_mask, other=0.0)
            tl.store(out_row[:, None, None] + h[None, :, None] * HEAD_DIM + c[None, None, :],
                     rest.to(out_ptr.dtype.element_ty), mask=tail_mask)


@triton.jit
def rotary_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, q_pos_ptr, k_pos_ptr, inv_freq_ptr, scale,
                  q_rows, k_rows, q_len, k_len, num_q_programs,
                  stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                  stride_qpb, stride_qpt, stride_kpb, stride_kpt, NUM_HQ: tl.constexpr, NUM_HK: tl.constexpr,
                  HALF: tl.constexpr, TAIL: tl.constexpr, INVERSE: tl.constexpr, PRECISE: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                  BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    """One launch for q and k: programs [0, num_q_programs) take BLOCK_T tokens of q, the rest of k."""
    pid = tl.program_id(0)
    if pid < num_q_programs:
        _rotate_rows(q_ptr, q_out_ptr, q_pos_ptr, inv_freq_ptr, scale, pid * BLOCK_T, q_rows, q_len,
                     stride_qb, stride_qt, stride_qh, stride_qpb, stride_qpt, NUM_HQ,
                     HALF, TAIL, INVERSE, PRECISE, BLOCK_T, BLOCK_HQ, BLOCK_HALF, BLOCK_TAIL)
    else:
        _rotate_rows(k_ptr, k_out_ptr, k_pos_ptr, inv_freq_ptr, scale, (pid - num_q_programs) * BLOCK_T, k_rows,
                     k_len, stride_kb, stride_kt, stride_kh, stride_kpb, stride_kpt, NUM_HK,
                     HALF, TAIL, INVERSE, PRECISE, BLOCK_T, BLOCK_HK, BLOCK_HALF, BLOCK_TAIL)
