"""One pre-norm transformer block: ``x + Attn(norm(x))`` then ``x + MLP(norm(x))``.

Under sequence parallelism the residual stream and the norms work on this rank's sequence
shard [B, T / tp, hidden]; Attn and MLP gather / reduce-scatter along T themselves.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megafire.config import ModelConfig
from megafire.parallel.context import ParallelContext
from megafire.positional import PositionalEncoding

from .attention import Attention
from .layers import RMSNorm, SwiGLU


class Block(nn.Module):
    """Pre-norm decoder block (RMSNorm, causal GQA attention, SwiGLU MLP)."""

    def __init__(self, cfg: ModelConfig, backend: str, parallel: ParallelContext, mp_config,
                 encoding: Optional[PositionalEncoding], layer_index: int, *, fused_qkv: bool = True):
        super().__init__()
        self.layer_index = layer_index
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, sequence_parallel=parallel.sp)
        self.attn = Attention(cfg, backend, parallel, mp_config, encoding, layer_index, fused_qkv=fused_qkv)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, sequence_parallel=parallel.sp)
        self.mlp = SwiGLU(cfg, parallel, mp_config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, segment_ids: Optional[torch.Tensor] = None,
                cache=None) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden] (sequence parallel: [B, T / tp, hidden] both)."""
        x = x + self.attn(self.attn_norm(x), positions, segment_ids, cache)
        x = x + self.mlp(self.mlp_norm(x))
        return x
