"""ALiBi: attention with linear biases (Press et al., 2022).

``b_h(i, j) = -m_h * (i - j)`` for ``j <= i``. Slopes for ``H`` heads:

* ``H`` a power of two: the geometric sequence ``m_h = 2^(-8 h / H)``, ``h = 1..H``;
* otherwise, with ``P`` the largest power of two below ``H``: the ``P`` slopes of the
  power-of-two rule, followed by the first ``H - P`` of every other slope (the 1st, 3rd,
  5th, ...) of the ``2P`` rule -- the rule of the paper's reference code.

Under TP a rank holds the slopes of its head range. For ``j > i`` (masked by the attention)
the distance is clamped to 0, so the bias is 0 there, finite like every bias encoding here.
"""
from __future__ import annotations

import math

import torch

from .base import PositionalEncoding, relative_positions


def alibi_slopes(num_heads: int) -> list[float]:
    """The ALiBi slopes of all ``num_heads`` heads, as Python floats (computed in float64)."""
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    lower = 2 ** int(math.floor(math.log2(num_heads)))
    if lower == num_heads:
        return geometric(num_heads)
    # The extra heads take the odd-numbered slopes of the doubled set: they interleave
    # between the existing ones instead of repeating them.
    return geometric(lower) + geometric(2 * lower)[0::2][: num_heads - lower]


class ALiBi(PositionalEncoding):
    name = "alibi"
    kind = "bias"
    fp32_buffers = ("slopes",)

    def __init__(self, num_heads: int, head_dim: int, *, tp_rank: int = 0, tp_size: int = 1):
        super().__init__(num_heads, head_dim, tp_rank=tp_rank, tp_size=tp_size)
        local = alibi_slopes(num_heads)[self.head_start:self.head_start + self.num_heads_local]
        # [H_local] fp32; read directly by the fused kernels
        self.register_buffer("slopes", torch.tensor(local, dtype=torch.float32), persistent=False)

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        rel = relative_positions(q_pos, k_pos).clamp_min(0).float()  # [(B,) Tq, Tk]
        slopes = self.slopes.float().view(-1, 1, 1)  # [H_local, 1, 1]
        return -slopes * rel.unsqueeze(-3)  # [(B,) H_local, Tq, Tk]

    def flops(self, num_scores: int, num_tokens: int) -> int:
        return num_scores * (1 + self.num_heads_local)  # i - j once, one multiply per head
