"""Fixed sinusoidal absolute position encoding (Vaswani et al., 2017).

``PE(p, 2k) = sin(p * base^(-2k/d))``, ``PE(p, 2k+1) = cos(p * base^(-2k/d))`` with
``d = hidden_size`` (even) and ``base = 10000``; ``embed(x, p) = x + PE(p)``. Computed from
the positions on the fly in fp32 (no table, so no length limit). The paper's scaling of the
token embeddings by sqrt(d) is the model's business, not this module's.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import PositionalEncoding


class Sinusoidal(PositionalEncoding):
    name = "sinusoidal"
    kind = "absolute"
    fp32_buffers = ("inv_freq",)

    def __init__(self, num_heads: int, head_dim: int, *, tp_rank: int = 0, tp_size: int = 1,
                 hidden_size: Optional[int] = None, base: float = 10000.0):
        super().__init__(num_heads, head_dim, tp_rank=tp_rank, tp_size=tp_size)
        self.hidden_size = hidden_size if hidden_size is not None else num_heads * head_dim
        if self.hidden_size <= 0 or self.hidden_size % 2:
            raise ValueError(f"sinusoidal encoding needs an even positive hidden_size, got {self.hidden_size}")
        if base <= 0:
            raise ValueError(f"base must be positive, got {base}")
        self.base = float(base)
        exponents = torch.arange(0, self.hidden_size, 2, dtype=torch.float64) / self.hidden_size
        # [hidden/2]; computed in float64 then rounded once, so it is exact to fp32 precision
        self.register_buffer("inv_freq", (self.base ** -exponents).float(), persistent=False)

    def encoding(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [T] | [B, T] -> fp32 [T, hidden] | [B, T, hidden], sin/cos interleaved."""
        angles = positions.float().unsqueeze(-1) * self.inv_freq  # [..., T, hidden/2]
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, T, hidden]
        return x + self.encoding(positions).to(x.dtype)

    def flops(self, num_scores: int, num_tokens: int) -> int:
        return 2 * num_tokens * self.hidden_size  # sin or cos, and the add, per element

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden_size={self.hidden_size}, base={self.base:g}"
