"""Attention backends (how scores are computed), independent of which encoding made the bias.

``reference`` (materialized fp32, every device, the oracle), ``sdpa`` (torch SDPA, no bias),
``fused`` (Triton, bias in-kernel; megafire.attention.fused), ``flex`` (torch FlexAttention,
bias as a score_mod; megafire.attention.flex), chosen by ``dispatch``.
"""
from __future__ import annotations

from .dispatch import BACKENDS, check_backend, get_attention_fn, resolve_backend
from .reference import allowed_mask, reference_attention
from .sdpa import sdpa_attention

__all__ = ["BACKENDS", "check_backend", "resolve_backend", "get_attention_fn", "allowed_mask",
           "reference_attention", "sdpa_attention"]
