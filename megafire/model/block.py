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
        #: (pre, post) compiled halves around an eager attention call (megafire.model.perf.compile_block)
        self.split_compiled = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, segment_ids: Optional[torch.Tensor] = None,
                cache=None) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden] (sequence parallel: [B, T / tp, hidden] both)."""
        if self.split_compiled is not None and cache is None:
            pre, post = self.split_compiled
            q, k, v = pre(x, positions)
            return post(x, self.attn.attend(q, k, v, positions, positions, segment_ids, segment_ids))
        x = x + self.attn(self.attn_norm(x), positions, segment_ids, cache)
        x = x + self.mlp(self.mlp_norm(x))
        return x

    def pre_attention(self, x: torch.Tensor, positions: torch.Tensor):
        """x [B, T, hidden] -> q, k, v of this block's attention, as fresh tensors: they leave a
        compiled graph here, and several outputs that alias one intermediate (views of the QKV
        product) made AOT autograd's alias replay produce garbage view sizes (torch 2.13)."""
        q, k, v = self.attn.qkv_heads(self.attn_norm(x), positions)
        return q.contiguous(), k.contiguous(), v.contiguous()

    def post_attention(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The residual stream x [B, T, hidden] and attention output o [B, T, Hq_local, D] -> block output."""
        x = x + self.attn.project_out(o)
        return x + self.mlp(self.mlp_norm(x))
