"""T5 relative position bias (Raffel et al., 2020), causal (one-directional) bucketing.

``b_h(i, j) = W[bucket(i - j), h]`` with a learnable table ``W`` of ``num_buckets x H``
scalars. With ``n = max(i - j, 0)``, ``E = num_buckets // 2`` exact buckets and
``max_distance`` ``M``:

    bucket(n) = n                                                   if n < E
              = min(E + floor(log(n / E) / log(M / E) * (num_buckets - E)), num_buckets - 1)

so distances below ``E`` get their own bucket and the rest share log-spaced buckets up to
``M``, beyond which everything lands in the last bucket. This equals Mesh TensorFlow's /
transformers' ``_relative_position_bucket(j - i, bidirectional=False)`` (the log is taken in
fp32 as there, so bucket edges agree bit for bit). Defaults: 32 buckets, ``M = 128``.

One table serves every layer by default (``shared=True``, as in T5). The table is
initialized N(0, (H * head_dim)^-0.5) (transformers' T5 init with d_model = H * head_dim)
for all heads from a local generator, then sliced to the local heads (columns).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import PositionalEncoding, local_generator, relative_positions


def t5_causal_bucket(rel: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """rel = i - j (any int shape) -> int64 bucket ids in [0, num_buckets); rel < 0 -> bucket 0."""
    n = rel.long().clamp_min(0)
    exact = num_buckets // 2
    # clamp before the log: n < exact takes the other branch anyway, and log(0) -> -inf -> long is undefined
    scaled = (torch.log(n.clamp_min(exact).float() / exact) / math.log(max_distance / exact)
              * (num_buckets - exact))
    large = (exact + scaled.long()).clamp_max(num_buckets - 1)
    return torch.where(n < exact, n, large)


class T5RelativeBias(PositionalEncoding):
    name = "t5"
    kind = "bias"

    def __init__(self, num_heads: int, head_dim: int, *, tp_rank: int = 0, tp_size: int = 1,
                 num_buckets: int = 32, max_distance: int = 128, shared: bool = True):
        super().__init__(num_heads, head_dim, tp_rank=tp_rank, tp_size=tp_size)
        if num_buckets < 2 or num_buckets % 2:
            raise ValueError(f"num_buckets must be an even integer >= 2, got {num_buckets}")
        if max_distance <= num_buckets // 2:
            raise ValueError(f"max_distance must exceed num_buckets // 2 = {num_buckets // 2}, got {max_distance}")
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.shared_across_layers = bool(shared)
        full = torch.randn(num_buckets, num_heads, generator=local_generator())  # [buckets, H]
        full *= (num_heads * head_dim) ** -0.5
        local = full[:, self.head_start:self.head_start + self.num_heads_local].contiguous()  # [buckets, H_local]
        self.relative_attention_bias = nn.Embedding(num_buckets, self.num_heads_local, _weight=local)

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        bucket = t5_causal_bucket(relative_positions(q_pos, k_pos), self.num_buckets, self.max_distance)
        table = self.relative_attention_bias.weight  # [buckets, H_local]
        table = table.to(torch.promote_types(table.dtype, torch.float32))
        return F.embedding(bucket, table).movedim(-1, -3)  # [(B,) Tq, Tk, H] -> [(B,) H, Tq, Tk]

    def flops(self, num_scores: int, num_tokens: int) -> int:
        # bucketing: i-j, clamp, div, log, mul, floor, add, min, compare/select; the lookup is free
        return 9 * num_scores

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_buckets={self.num_buckets}, max_distance={self.max_distance}, "
                f"shared={self.shared_across_layers}")
