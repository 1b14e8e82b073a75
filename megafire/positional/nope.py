"""NoPE: no position encoding (Kazemnejad et al., 2023).

A causal decoder can still infer positions from the mask; the encoding contributes nothing,
costs nothing and has no parameters.
"""
from __future__ import annotations

from .base import PositionalEncoding


class NoPE(PositionalEncoding):
    name = "nope"
    kind = "none"

    def __init__(self, num_heads: int, head_dim: int, *, tp_rank: int = 0, tp_size: int = 1):
        super().__init__(num_heads, head_dim, tp_rank=tp_rank, tp_size=tp_size)
