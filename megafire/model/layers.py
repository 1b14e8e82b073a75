"""Small building blocks: RMSNorm, the SwiGLU MLP, init methods and encoding construction."""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.utils import init_method_normal, scaled_init_method_normal
from torch import nn

from megafire.config import ModelConfig
from megafire.parallel.context import ParallelContext
from megafire.positional import PositionalEncoding, build_encoding, encoding_class


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * w``, computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)[0].chunk(2, dim=-1)               # [B, T, F_local] each
        return self.down(F.silu(gate) * up)[0]                       # [B, T, hidden]


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
        return build_encoding(cfg.position.name, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                              tp_rank=parallel.tp_rank, tp_size=parallel.tp_size, **options)

    first = build()
    if first.kind == "none":
        return None, [None] * cfg.num_layers
    if first.kind == "absolute":
        return first, [None] * cfg.num_layers
    if first.shared_across_layers:
        return None, [first] * cfg.num_layers
    return None, [first] + [build() for _ in range(cfg.num_layers - 1)]
