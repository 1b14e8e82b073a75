"""Learned absolute position embeddings (GPT-2 / BERT style).

``embed(x, p) = x + E[p]`` with ``E`` an ``nn.Embedding(max_positions, hidden_size)``
initialized N(0, 0.02). Positions must lie in ``[0, max_positions)``: a learned table
cannot extrapolate, and we raise a clear error rather than index out of range.

Under tensor parallelism the token embeddings are full-width on every rank (after the
vocab-parallel all-reduce), so every rank holds the whole table and computes the same,
*complete* gradient for it. It is therefore NOT flagged ``megafire_tp_replicated`` (that
flag means "partial gradients, all-reduce over TP"), unlike FIRE's shared layers.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import PositionalEncoding


class LearnedAbsolute(PositionalEncoding):
    name = "learned"
    kind = "absolute"

    def __init__(self, num_heads: int, head_dim: int, *, tp_rank: int = 0, tp_size: int = 1,
                 hidden_size: Optional[int] = None, max_positions: int = 2048, init_std: float = 0.02):
        super().__init__(num_heads, head_dim, tp_rank=tp_rank, tp_size=tp_size)
        self.hidden_size = hidden_size if hidden_size is not None else num_heads * head_dim
        if self.hidden_size <= 0 or max_positions <= 0:
            raise ValueError(f"hidden_size and max_positions must be positive, got "
                             f"{self.hidden_size}, {max_positions}")
        self.max_positions = max_positions
        self.embedding = nn.Embedding(max_positions, self.hidden_size)
        nn.init.normal_(self.embedding.weight, mean=0.0, std=init_std)

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, T, hidden]; positions: [T] or [B, T]
        if positions.numel():
            lo, hi = int(positions.min()), int(positions.max())  # one host sync; worth the clear error
            if lo < 0 or hi >= self.max_positions:
                raise ValueError(f"learned absolute positions must lie in [0, max_positions={self.max_positions}), "
                                 f"got range [{lo}, {hi}]; raise max_positions or use a relative encoding")
        pe = self.embedding(positions.long())  # [T, hidden] | [B, T, hidden]
        return x + pe.to(x.dtype)

    def flops(self, num_scores: int, num_tokens: int) -> int:
        return num_tokens * self.hidden_size  # one add per element; the lookup is free

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden_size={self.hidden_size}, max_positions={self.max_positions}"
