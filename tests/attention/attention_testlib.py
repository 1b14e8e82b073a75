"""Test-local encodings for the attention-backend tests."""
from __future__ import annotations

import torch

from megafire.positional import PositionalEncoding, relative_positions


class RandomBias(PositionalEncoding):
    """``b[h, i, j] = table[h, clamp(i - j, -R, R) + R] + 0.01 * i``: arbitrary, finite everywhere."""

    name = "random_bias"
    kind = "bias"

    def __init__(self, num_heads, head_dim, *, tp_rank=0, tp_size=1, radius=64):
        super().__init__(num_heads, head_dim, tp_rank=tp_rank, tp_size=tp_size)
        self.radius = radius
        self.table = torch.nn.Parameter(torch.randn(self.num_heads_local, 2 * radius + 1))

    def bias(self, q_pos, k_pos):
        rel = relative_positions(q_pos, k_pos).clamp(-self.radius, self.radius) + self.radius  # [(B,) Tq, Tk]
        b = self.table[:, rel]                                            # [H, (B,) Tq, Tk]
        if rel.dim() == 3:
            b = b.transpose(0, 1)                                         # [B, H, Tq, Tk]
        return b + 0.01 * q_pos.float().unsqueeze(-1).unsqueeze(-3)


class FakeRotary(PositionalEncoding):
    name = "fake_rotary"
    kind = "rotary"
