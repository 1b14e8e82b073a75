"""Grouped-query self-attention on megatron column/row-parallel projections.

For hidden states ``x`` [B, T, hidden]::

    q, k, v = W_q x, W_k x, W_v x                 Hq query heads, Hkv key/value heads, D = hidden / Hq
    (q, k)  = rotate(q, k, pos, pos)              rotary encodings only
    o       = attention(q, k, v, bias(q_pos, k_pos), causal & same-document mask)
    out     = W_o o

Tensor parallelism: each rank owns a contiguous range of Hkv / tp key/value groups and the
Hq / tp query heads that read them (query head h reads group h // (Hq / Hkv)), so attention
needs no communication; ``W_o`` is row-parallel and all-reduces its output. Under sequence
parallelism ``x`` and the output are sequence shards [B, T / tp, hidden]: the QKV projection
all-gathers its input along T (attention sees the whole sequence for its local heads) and
``W_o`` reduce-scatters its output along T instead of all-reducing it.

The fused QKV weight is laid out per key/value group: ``[q_g0 .. q_g(R-1), k_g, v_g]`` for
g = 0..Hkv-1 with R = Hq / Hkv query heads per group; a contiguous split by group gives
each rank its heads, so the full weight (built from the same seed) does not depend on TP.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from megafire.attention import check_backend, get_attention_fn, sdpa_attention
from megafire.attention.dispatch import fused_attention, sdpa_or_fused_attention
from megafire.config import ModelConfig
from megafire.parallel.context import ParallelContext
from megafire.positional import PositionalEncoding

from .layers import column_parallel, init_methods, row_parallel


class Attention(nn.Module):
    """Causal GQA self-attention for one layer (maths and layout: module docstring)."""

    def __init__(self, cfg: ModelConfig, backend: str, parallel: ParallelContext, mp_config,
                 encoding: Optional[PositionalEncoding], layer_index: int, *, fused_qkv: bool = True):
        super().__init__()
        tp = parallel.tp_size
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads
        if self.num_heads % tp or self.num_kv_heads % tp:
            raise ValueError(f"parallel.tp={tp} must divide model.num_heads={self.num_heads} "
                             f"and model.num_kv_heads={self.num_kv_heads}")
        self.head_dim = cfg.head_dim
        self.heads_local, self.kv_heads_local = self.num_heads // tp, self.num_kv_heads // tp
        self.group_size = self.num_heads // self.num_kv_heads            # R query heads per kv head
        self.layer_index = layer_index
        self.backend = backend
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim)
        # only rotary and bias encodings act inside attention; absolute ones live at the embedding
        self.encoding = encoding if encoding is not None and encoding.kind in ("rotary", "bias") else None
        check_backend(backend, self.encoding)

        init, out_init = init_methods(cfg)
        col = dict(config=mp_config, init_method=init, bias=cfg.linear_bias, gather_output=False,
                   tp_group=parallel.tp_group)
        D, H, Hkv = self.head_dim, self.num_heads, self.num_kv_heads
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv = ColumnParallelLinear(cfg.hidden_size, (H + 2 * Hkv) * D, **col)
        else:
            self.q = ColumnParallelLinear(cfg.hidden_size, H * D, **col)
            self.kv = ColumnParallelLinear(cfg.hidden_size, 2 * Hkv * D, **col)   # per kv head: [k_g, v_g]
        self.out = RowParallelLinear(H * D, cfg.hidden_size, config=mp_config, init_method=out_init,
                                     bias=cfg.linear_bias, input_is_parallel=True, skip_bias_add=False,
                                     tp_group=parallel.tp_group)
        if parallel.sp and self.out.bias is not None:
            self.out.bias.megafire_tp_replicated = True                  # added to each sequence shard
        self.parallel = parallel
        self._bound = None              # (device type, attention function) once bound (perf.apply)
        self.fused_inline = True         # fused kernels: the inline op (megafire.model.perf)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] (sequence parallel: [B, T / tp, hidden]) -> q [B, T, Hq_local, D], k and v
        [B, T, Hkv_local, D]."""
        G, R, D = self.kv_heads_local, self.group_size, self.head_dim
        if self.fused_qkv:
            qkv = column_parallel(self.qkv, x, self.parallel)
            B, T = qkv.shape[:2]
            qkv = qkv.view(B, T, G, R + 2, D)                            # [B, T, G, R + 2, D]
            q, k, v = qkv[:, :, :, :R], qkv[:, :, :, R], qkv[:, :, :, R + 1]
            return q.reshape(B, T, G * R, D), k, v
        q, kv = column_parallel(self.q, x, self.parallel), column_parallel(self.kv, x, self.parallel)
        B, T = q.shape[:2]
        q = q.view(B, T, G * R, D)                                       # [B, T, Hq_local, D]
        kv = kv.view(B, T, G, 2, D)                                      # [B, T, G, 2, D]
        return q, kv[:, :, :, 0], kv[:, :, :, 1]

    def bind(self, device_type: str) -> None:
        """Resolve the attention backend for ``device_type`` now, eagerly (megafire.model.perf:
        a compiled block then reads the function instead of tracing the dispatch)."""
        self._bound = (device_type, get_attention_fn(self.backend, self.encoding, device_type))

    @property
    def traceable(self) -> bool:
        """The bound backend can run inside a compiled graph (SDPA, the fused kernels); the others
        (reference, flex) run eagerly between the block's two compiled halves."""
        return self._bound is not None and self._bound[1] in TRACEABLE

    def qkv_heads(self, x: torch.Tensor, positions: torch.Tensor):
        """x [B, T, hidden] -> q [B, T, Hq_local, D], k, v [B, T, Hkv_local, D] (rotated for RoPE)."""
        q, k, v = self.project(x)
        if self.encoding is not None and self.encoding.kind == "rotary":
            q, k = self.encoding.rotate(q, k, positions, positions)
        return q, k, v

    def attend(self, q, k, v, q_pos, k_pos, segment_ids_q=None, segment_ids_k=None) -> torch.Tensor:
        """The attention backend's call: q [B, Tq, Hq_local, D], k, v [B, Tk, Hkv_local, D] -> [B, Tq, Hq_local, D]."""
        bound = self._bound
        if bound is not None and bound[0] == q.device.type:
            attend = bound[1]
        else:
            attend = get_attention_fn(self.backend, self.encoding, q.device.type)
        extra = {"inline": self.fused_inline} if attend in FUSED else {}
        return attend(q, k, v, self.encoding, q_pos, k_pos, causal=True, segment_ids_q=segment_ids_q,
                      segment_ids_k=segment_ids_k, softmax_scale=self.softmax_scale, **extra)

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        """o [B, T, Hq_local, D] -> [B, T, hidden] (SP: [B, T / tp, hidden])."""
        return row_parallel(self.out, o.flatten(2), self.parallel)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, segment_ids: Optional[torch.Tensor] = None,
                cache=None) -> torch.Tensor:
        """x [B, T, hidden], positions [T] | [B, T], segment_ids [B, T] | None -> [B, T, hidden].

        Sequence parallel: x and the output are [B, T / tp, hidden]; positions and segment ids
        stay full length.

        With a :class:`~megafire.model.cache.KVCache`, the new keys/values are appended and
        the queries attend to every cached key (the cache supplies k_pos and key segments).
        """
        if cache is not None and self.parallel.sp:
            raise ValueError("KV-cache decoding is not supported with sequence parallelism; build the model "
                             "without parallel.sequence_parallel for inference")
        q, k, v = self.qkv_heads(x, positions)
        k_pos, segment_ids_k = positions, segment_ids
        if cache is not None:
            k, v, k_pos, segment_ids_k = cache.update(self.layer_index, k, v)
        o = self.attend(q, k, v, positions, k_pos, segment_ids, segment_ids_k)   # [B, T, Hq_local, D]
        return self.project_out(o)


#: backends torch.compile traces into the block's graph: SDPA, the fused Triton kernels (a
#: registered triton_op / custom ops, megafire.attention.fused._function) and auto's per-call
#: choice between the two for encodings without a bias
TRACEABLE = (sdpa_attention, fused_attention, sdpa_or_fused_attention)
#: the backends that take ``inline`` (megafire.model.perf.inline_kernels)
FUSED = (fused_attention, sdpa_or_fused_attention)

