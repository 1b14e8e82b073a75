"""The ``sdpa`` backend: torch's scaled_dot_product_attention, for encodings without a bias.

Same maths and masking convention as :mod:`megafire.attention.reference` with ``bias = 0``
(none / absolute / rotary encodings; rotary is applied to q and k before this call). torch
picks flash / memory-efficient / math kernels. The fast flash path is taken only with no
explicit mask: a full square causal block (``Tq == Tk``) uses ``is_causal``, one decoding
query with no segment ids needs no mask at all; otherwise (KV cache with Tq > 1, document
masking) a boolean mask from :func:`allowed_mask` is passed.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megafire.positional.base import PositionalEncoding

from .reference import _check_shapes, allowed_mask


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   encoding: Optional[PositionalEncoding], q_pos: torch.Tensor, k_pos: torch.Tensor, *,
                   causal: bool = True, segment_ids_q: Optional[torch.Tensor] = None,
                   segment_ids_k: Optional[torch.Tensor] = None,
                   softmax_scale: Optional[float] = None) -> torch.Tensor:
    """q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D] -> o [B, Tq, Hq, D]; positions are unused (no bias)."""
    if encoding is not None and encoding.kind == "bias":
        raise ValueError(f"the sdpa backend cannot add the bias of encoding {encoding.name!r}; "
                         f"use attention.backend=reference or fused")
    _check_shapes(q, k, v)
    Tq, Tk = q.shape[1], k.shape[1]
    segments = segment_ids_q is not None or segment_ids_k is not None
    is_causal, mask = False, None
    if causal and not segments and Tq == Tk:
        is_causal = True
    elif segments or (causal and Tq > 1):
        mask = allowed_mask(Tq, Tk, q.device, causal=causal, q_offset=Tk - Tq,
                            segment_ids_q=segment_ids_q, segment_ids_k=segment_ids_k)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),       # [B, H, T, D]
        attn_mask=mask, is_causal=is_causal, scale=softmax_scale,
        enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)                                         # [B, Tq, Hq, D]
