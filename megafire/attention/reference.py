"""The reference attention backend: materialized fp32 scores, any device, every encoding.

For query ``i`` (index in ``0..Tq-1``) and key ``j`` (index in ``0..Tk-1``)::

    s[h, i, j] = (q[h, i] . k[g(h), j]) * scale + bias[h, i, j]       (fp32)
    p[h, i, :] = softmax_j( s[h, i, j]  if allowed(i, j)  else  -inf )
    o[h, i]    = sum_j p[h, i, j] v[g(h), j]

with ``scale = 1 / sqrt(D)`` by default, ``g(h) = h // (Hq / Hkv)`` (grouped-query
attention) and ``bias = encoding.bias(q_pos, k_pos)`` for bias encodings, zero otherwise.

Masking is by *index*, aligned at the end so that a KV cache works (queries are the last
``Tq`` of the ``Tk`` keys)::

    allowed(i, j) = [j <= (Tk - Tq) + i]                 (causal)
                    and [seg_q[i] == seg_k[j]]           (when segment ids are given)

Rows with no allowed key (possible only without the causal diagonal) produce zeros. This is
the oracle of every other backend; it works in query chunks so that long evaluation
sequences fit in memory (the bias is evaluated per chunk with the true query positions).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megafire.positional.base import PositionalEncoding

#: query rows per chunk: bounds the [B, H, chunk, Tk] fp32 score tensor.
QUERY_CHUNK = 1024


def allowed_mask(tq: int, tk: int, device, *, causal: bool = True, q_offset: Optional[int] = None,
                 segment_ids_q: Optional[torch.Tensor] = None,
                 segment_ids_k: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Boolean ``[Tq, Tk]`` (``[B, 1, Tq, Tk]`` with [B, T] segment ids) of allowed (i, j); None = all.

    Causal: ``j <= i + q_offset``; by default ``q_offset = Tk - Tq`` (the queries are the last
    Tq keys); a caller working on the chunk of query rows starting at ``c`` of ``Tq_total``
    rows passes ``Tk - Tq_total + c``.
    """
    mask = None
    q_offset = tk - tq if q_offset is None else q_offset
    if causal:
        i = torch.arange(tq, device=device).unsqueeze(-1)            # [Tq, 1]
        j = torch.arange(tk, device=device).unsqueeze(0)             # [1, Tk]
        mask = j <= i + q_offset                                     # [Tq, Tk]
    if segment_ids_q is not None or segment_ids_k is not None:
        if segment_ids_q is None or segment_ids_k is None:
            raise ValueError("segment ids must be given for both queries and keys, or for neither")
        same = segment_ids_q.unsqueeze(-1) == segment_ids_k.unsqueeze(-2)   # [B, Tq, Tk] or [Tq, Tk]
        if same.dim() == 3:
            same = same.unsqueeze(1)                                 # [B, 1, Tq, Tk]
        mask = same if mask is None else same & mask
    return mask


def _check_shapes(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, Tq, Hq, D], k and v [B, Tk, Hkv, D]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[2] % k.shape[2]:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)}: batch and head_dim "
                         f"must match and Hq must be a multiple of Hkv")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"more queries ({q.shape[1]}) than keys ({k.shape[1]})")


def _rows(x: Optional[torch.Tensor], start: int, stop: int) -> Optional[torch.Tensor]:
    """Rows [start, stop) of the last dim of a [T] or [B, T] tensor (None passes through)."""
    return None if x is None else x[..., start:stop]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        encoding: Optional[PositionalEncoding], q_pos: torch.Tensor, k_pos: torch.Tensor, *,
                        causal: bool = True, segment_ids_q: Optional[torch.Tensor] = None,
                        segment_ids_k: Optional[torch.Tensor] = None,
                        softmax_scale: Optional[float] = None) -> torch.Tensor:
    """q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D] -> o [B, Tq, Hq, D] in q's dtype (maths: module doc)."""
    _check_shapes(q, k, v)
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    use_bias = encoding is not None and encoding.kind == "bias"
    kf = k.float().permute(0, 2, 3, 1).unsqueeze(2)                  # [B, Hkv, 1, D, Tk]
    vf = v.float().transpose(1, 2).unsqueeze(2)                      # [B, Hkv, 1, Tk, D]
    out = []
    for start in range(0, Tq, QUERY_CHUNK):
        stop = min(Tq, start + QUERY_CHUNK)
        qc = q[:, start:stop].float().transpose(1, 2)                # [B, Hq, C, D]
        qc = qc.reshape(B, Hkv, Hq // Hkv, stop - start, D)          # [B, Hkv, R, C, D]
        s = (qc @ kf).reshape(B, Hq, stop - start, Tk) * scale       # [B, Hq, C, Tk]
        if use_bias:
            s = s + encoding.bias(_rows(q_pos, start, stop), k_pos).float()   # [(B,) Hq, C, Tk]
        mask = allowed_mask(stop - start, Tk, q.device, causal=causal, q_offset=Tk - Tq + start,
                            segment_ids_q=_rows(segment_ids_q, start, stop), segment_ids_k=segment_ids_k)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)                 # fully masked rows -> 0
        p = p.reshape(B, Hkv, Hq // Hkv, stop - start, Tk)
        out.append((p @ vf).reshape(B, Hq, stop - start, D))         # [B, Hq, C, D]
    return torch.cat(out, dim=2).transpose(1, 2).to(q.dtype)        # [B, Tq, Hq, D]
