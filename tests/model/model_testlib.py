"""Test helpers for tests/model: a test-local bias encoding and a tiny config."""
from __future__ import annotations

import torch

from megafire.config import Config
from megafire.positional import PositionalEncoding, mark_tp_replicated, register, relative_positions


class ToyBias(PositionalEncoding):
    """``b[h,i,j] = -s_h * log(1 + r) + w * r / (i + 8)``, ``r = max(i-j, 0)``: per-head slopes
    (sharded by head) plus one TP-replicated scalar ``w`` whose term depends on the absolute
    query position (like FIRE's normalization) and on j (so it is not softmax-invariant)."""

    name = "toy_bias"
    kind = "bias"

    def __init__(self, num_heads, head_dim, *, tp_rank=0, tp_size=1, shared=False):
        super().__init__(num_heads, head_dim, tp_rank=tp_rank, tp_size=tp_size)
        full = torch.linspace(0.5, 2.0, num_heads)
        self.slopes = torch.nn.Parameter(full[self.head_start:self.head_start + self.num_heads_local].clone())
        self.w = torch.nn.Parameter(torch.tensor(0.7))
        mark_tp_replicated(self.w)
        self.shared_across_layers = shared

    def bias(self, q_pos, k_pos):
        rel = relative_positions(q_pos, k_pos).clamp_min(0).float()           # [(B,) Tq, Tk]
        qf = q_pos.float().unsqueeze(-1)                                       # [(B,) Tq, 1]
        b = -self.slopes.view(-1, 1, 1) * torch.log1p(rel).unsqueeze(-3)     # [(B,) H, Tq, Tk]
        return b + (self.w * rel / (qf + 8)).unsqueeze(-3)

    def flops(self, num_scores, num_tokens):
        return 4 * num_scores * self.num_heads_local


register("toy_bias", ToyBias)


def tiny_config(position: str = "nope", options: dict | None = None, **model) -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads = 64, 32, 2, 4, 2
    m.max_positions = 256
    for k, v in model.items():
        setattr(m, k, v)
    m.position.name = position
    m.position.options = dict(options or {})
    cfg.attention.backend = "auto"
    return cfg
