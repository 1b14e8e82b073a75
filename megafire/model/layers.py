"""Small building blocks: RMSNorm, the SwiGLU MLP, init methods, encoding construction, and the
column/row-parallel calls that sequence parallelism reroutes."""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.utils import init_method_normal, scaled_init_method_normal
from torch import nn

from megafire.config import ConfigError, ModelConfig
from megafire.parallel.comm import gather_seq, reduce_scatter_seq
from megafire.parallel.context import ParallelContext
from megafire.positional import PositionalEncoding, build_encoding, encoding_class

from . import perf


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * w``, computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, *, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        if sequence_parallel:
            # each TP rank normalizes its own sequence shard: partial gradients, summed over TP
            # by megafire.parallel's hooks for replicated parameters
            self.weight.megafire_tp_replicated = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def init_methods(cfg: ModelConfig):
    """(init for input-side weights, init for residual-output weights).

    ``N(0, std)`` and ``N(0, std / sqrt(2 * num_layers))`` (GPT-2 / Megatron scaled init for
    the projections that write into the residual stream).
    """
    return init_method_normal(cfg.init_std), scaled_init_method_normal(cfg.init_std, cfg.num_layers)


def column_parallel(layer: ColumnParallelLinear, x: torch.Tensor, parallel: ParallelContext,
                    weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``layer(x)`` (output sharded along its last dim); ``weight`` replaces a weightless layer's.

    Sequence parallel: ``x`` is this rank's sequence shard [B, T / tp, h]; it is all-gathered
    along T and multiplied here (megatron's own call would all-reduce the input gradient, which
    the gather's reduce-scatter already does).
    """
    if perf.direct(layer):   # tp = 1: the same product without megatron's autograd Function
        return perf.linear(layer, x, weight)
    if not parallel.sp:
        return layer(x, weight=weight)[0]
    return F.linear(gather_seq(x, parallel.tp_group), layer.weight if weight is None else weight, layer.bias)


def row_parallel(layer: RowParallelLinear, x: torch.Tensor, parallel: ParallelContext) -> torch.Tensor:
    """``layer(x)`` for input sharded along its last dim: the ranks' partial products summed.

    Sequence parallel: the sum is reduce-scattered along T, so each rank gets its sequence
    shard [B, T / tp, h]; the (replicated) bias is added to the shard.
    """
    if perf.direct(layer):
        return perf.linear(layer, x)
    if not parallel.sp:
        return layer(x)[0]
    y = reduce_scatter_seq(F.linear(x, layer.weight), parallel.tp_group)
    return y if layer.bias is None else y + layer.bias


class SwiGLU(nn.Module):
    """``MLP(x) = W_down( silu(W_gate x) * (W_up x) )``, gate and up fused in one column-parallel matmul.

    The fused weight is ``[W_gate; W_up]`` (2F x hidden) split with stride 2, so each TP rank
    holds matching slices ``[W_gate_r; W_up_r]`` and the full weight does not depend on TP.
    """

    def __init__(self, cfg: ModelConfig, parallel: ParallelContext, mp_config):
        super().__init__()
        init, out_init = init_methods(cfg)
        ffn = cfg.resolved_ffn_hidden_size
        if ffn % parallel.tp_size:
            raise ValueError(f"model.ffn_hidden_size={ffn} must be divisible by parallel.tp={parallel.tp_size}")
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, 2 * ffn, config=mp_config, init_method=init,
                                            bias=cfg.linear_bias, gather_output=False, stride=2,
                                            tp_group=parallel.tp_group)
        self.down = RowParallelLinear(ffn, cfg.hidden_size, config=mp_config, init_method=out_init,
                                      bias=cfg.linear_bias, input_is_parallel=True, skip_bias_add=False,
                                      tp_group=parallel.tp_group)
        if parallel.sp and self.down.bias is not None:
            self.down.bias.megafire_tp_replicated = True             # added to each sequence shard
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] (sequence parallel: [B, T / tp, hidden], in and out)."""
        gate, up = column_parallel(self.gate_up, x, self.parallel).chunk(2, dim=-1)   # [B, T, F_local] each
        return row_parallel(self.down, F.silu(gate) * up, self.parallel)           # [B, T, hidden]


def build_encodings(cfg: ModelConfig, parallel: ParallelContext
                    ) -> tuple[Optional[PositionalEncoding], list[Optional[PositionalEncoding]]]:
    """(encoding applied at the embedding or None, per-layer attention encodings).

    Absolute encodings are built once for the embedding stage; rotary and bias encodings are
    built per layer, or once and shared by every layer when the instance says
    ``shared_across_layers`` (T5, FIRE-S). NoPE yields None everywhere.
    """
    options = dict(cfg.position.options)
    cls = encoding_class(cfg.position.name)
    if "max_positions" in inspect.signature(cls.__init__).parameters and "max_positions" not in options:
        options["max_positions"] = cfg.max_positions

    def build() -> PositionalEncoding:
        encoding = build_encoding(cfg.position.name, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                                  tp_rank=parallel.tp_rank, tp_size=parallel.tp_size, **options)
        if hasattr(encoding, "set_fused_rotary"):   # an implementation choice, not an encoding option
            encoding.set_fused_rotary(cfg.position.fused_rotary)
        return encoding

    first = build()
    if cfg.position.fused_rotary == "true" and first.kind != "rotary":
        raise ConfigError(f"model.position.fused_rotary='true' needs a rotary encoding, but model.position.name="
                          f"{cfg.position.name!r} is of kind {first.kind!r}; allowed for it: auto, false")
    if first.kind == "none":
        return None, [None] * cfg.num_layers
    if first.kind == "absolute":
        return first, [None] * cfg.num_layers
    if first.shared_across_layers:
        return None, [first] * cfg.num_layers
    return None, [first] + [build() for _ in range(cfg.num_layers - 1)]
