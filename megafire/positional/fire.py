"""FIRE: functional interpolation for relative positions (Li et al., 2023, arXiv 2310.04418).

For query position ``i``, key position ``j <= i`` and each local head ``h``:

    b_h(i, j) = f_h( psi(i - j) / (psi(max(L, i)) + eps) ),     psi(x) = log(c * x + 1)

* ``f``: ``Linear(1, width) -> ReLU -> [Linear(width, width) -> ReLU] * (depth - 1) ->
  Linear(width, H)``, the same scalar-to-heads MLP for every (i, j).
* ``c = |c_raw|``, ``c_raw`` learnable, init ``init_c = 0.1``.
* ``L = |L_mult| * init_L``, ``L_mult`` learnable (``learn_L``), init 1; ``init_L = 512``
  suits training length 2048: keep ``L`` below the training length, or the MLP never sees
  inputs near 1 in training and has to extrapolate at evaluation.
* ``eps = 1e-6`` keeps the denominator non-zero at ``i = 0`` without a threshold.

For ``j <= i`` the MLP input lies in ``[0, 1]``; for ``i < L`` the denominator is the
constant ``psi(L)``, so the bias depends on ``i - j`` only (rows below ``L`` are Toeplitz).

Ablations (the paper's Section 5): ``use_log=False``: ``psi(x) = x``; ``use_threshold=False``:
``L = 0`` (normalize by ``psi(i)``; ``.L`` then reads 0); ``progressive=False``: no
normalization, the input is ``psi(i - j)`` (the raw ``i - j`` when also ``use_log=False``).

Departures from the paper's reference module: ``i - j < 0`` (masked positions) is clamped
to 0 rather than taken in absolute value, so the bias stays finite and cheap there;
``log1p`` replaces ``log(.. + 1)``; the bias is computed in fp32 whatever the parameter
dtype (fp64 only when the parameters are fp64, for gradcheck).

Which FIRE configuration represents which baseline *exactly* (tested): with a hidden unit
``relu(x)`` (weight 1, bias 0) and output weights ``w_h`` (other units and biases zero),
``f_h(x) = w_h * x`` for ``x >= 0``, so

* ALiBi ``-m_h (i - j)``: ``use_log=False, progressive=False``, ``w_h = -m_h``;
* Kerple-log ``-r1_h log(1 + r2 (i - j))`` with ``r2`` shared by the heads:
  ``progressive=False``, ``c = r2``, ``w_h = -r1_h``. (Per-head ``r2`` would need a
  non-linear ``f``, only approximable by a ReLU MLP; ``L`` above every query position
  gives the same with progressive interpolation on, scaled by ``psi(L) + eps``.)

Tensor parallelism: the hidden layers, ``c`` and ``L`` are replicated across TP ranks
(flagged ``megafire_tp_replicated``: their gradients are partial sums over the local heads
and must be all-reduced); the output layer holds only the local heads' rows. All layers are
initialized (PyTorch's default Linear init) from one local generator for all heads, then
the output rows are sliced, so TP shards concatenate to the TP=1 module under one seed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from .base import PositionalEncoding, local_generator, mark_tp_replicated, relative_positions


def _default_linear_init_(weight: torch.Tensor, bias: torch.Tensor, fan_in: int, gen: torch.Generator) -> None:
    # nn.Linear's own init (kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)) for both), from `gen`
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        weight.uniform_(-bound, bound, generator=gen)
        bias.uniform_(-bound, bound, generator=gen)


class FIRE(PositionalEncoding):
    name = "fire"
    kind = "bias"

    def __init__(self, num_heads: int, head_dim: int, *, tp_rank: int = 0, tp_size: int = 1,
                 width: int = 32, depth: int = 1, init_c: float = 0.1, init_L: float = 512.0,
                 learn_L: bool = True, shared: bool = False, use_log: bool = True,
                 use_threshold: bool = True, progressive: bool = True, eps: float = 1e-6):
        super().__init__(num_heads, head_dim, tp_rank=tp_rank, tp_size=tp_size)
        if width < 1 or depth < 1:
            raise ValueError(f"FIRE width and depth must be >= 1, got width={width}, depth={depth}")
        if init_c <= 0 or init_L <= 0 or eps < 0:
            raise ValueError(f"FIRE needs init_c > 0, init_L > 0, eps >= 0; got {init_c}, {init_L}, {eps}")
        self.width, self.depth, self.eps, self.init_L = width, depth, float(eps), float(init_L)
        self.use_log, self.use_threshold, self.progressive = bool(use_log), bool(use_threshold), bool(progressive)
        self.shared_across_layers = bool(shared)

        gen = local_generator()
        layers: list[nn.Module] = []
        for fan_in in [1] + [width] * (depth - 1):
            hidden = skip_init(nn.Linear, fan_in, width)  # skip_init: leave the global RNG alone
            _default_linear_init_(hidden.weight, hidden.bias, fan_in, gen)
            layers += [hidden, nn.ReLU()]
        full_w, full_b = torch.empty(num_heads, width), torch.empty(num_heads)  # all heads' rows
        _default_linear_init_(full_w, full_b, width, gen)
        out = skip_init(nn.Linear, width, self.num_heads_local)
        local = slice(self.head_start, self.head_start + self.num_heads_local)
        with torch.no_grad():
            out.weight.copy_(full_w[local])
            out.bias.copy_(full_b[local])
        self.mlp = nn.Sequential(*layers, out)
        self.c_raw = nn.Parameter(torch.tensor(float(init_c)))
        self.L_mult = nn.Parameter(torch.tensor(1.0), requires_grad=bool(learn_L))
        mark_tp_replicated(self.mlp[:-1])
        mark_tp_replicated(self.c_raw)
        mark_tp_replicated(self.L_mult)

    # --- effective parameters (0-dim tensors) -------------------------------------------
    @property
    def c(self) -> torch.Tensor:
        return self.c_raw.abs()

    @property
    def L(self) -> torch.Tensor:
        if not self.use_threshold:
            return torch.zeros_like(self.L_mult)
        return self.L_mult.abs() * self.init_L

    def psi(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log1p(self.c.to(x.dtype) * x) if self.use_log else x

    def mlp_input(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """The normalized distance x(i, j): [Tq, Tk] | [B, Tq, Tk]; in [0, 1] for j <= i."""
        dtype = torch.promote_types(self.c_raw.dtype, torch.float32)
        rel = relative_positions(q_pos, k_pos).clamp_min(0).to(dtype)  # [(B,) Tq, Tk]
        if not self.progressive:
            return self.psi(rel)
        i = q_pos.to(dtype).unsqueeze(-1)  # [(B,) Tq, 1]
        normalizer = self.psi(torch.maximum(i, self.L.to(dtype))) + self.eps  # [(B,) Tq, 1]
        return self.psi(rel) / normalizer

    def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """f applied elementwise: x [...] -> [..., H_local], in x's dtype whatever the parameters'."""
        h = x.unsqueeze(-1)  # [..., 1]
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                h = F.linear(h, layer.weight.to(h.dtype), layer.bias.to(h.dtype))
            else:
                h = layer(h)
        return h

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        if q_pos.dim() == 2 and not q_pos.is_cuda:
            table = self._distinct_position_bias(q_pos, k_pos)
            if table is not None:
                return table
        x = self.mlp_input(q_pos, k_pos)  # [(B,) Tq, Tk]
        return self.mlp_forward(x).movedim(-1, -3)  # [(B,) H_local, Tq, Tk]

    def _distinct_position_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor):
        """Per-batch positions of packed documents repeat (each document restarts at 0):
        evaluate f once per distinct (i, j) in [0, P)^2 and gather, when P^2 < B*Tq*Tk.
        Same values as the direct path (f is elementwise); gradients flow through the gather."""
        lo = min(int(q_pos.min()), int(k_pos.min()))
        num = max(int(q_pos.max()), int(k_pos.max())) + 1
        if lo < 0 or num * num >= q_pos.numel() * k_pos.size(-1):
            return None
        grid = torch.arange(num, device=q_pos.device)
        table = self.bias(grid, grid).flatten(1)  # [H_local, P*P]
        idx = q_pos.long().unsqueeze(-1) * num + k_pos.long().unsqueeze(-2)  # [B, Tq, Tk]
        return table[:, idx].movedim(0, 1)  # [B, H_local, Tq, Tk]

    def flops(self, num_scores: int, num_tokens: int) -> int:
        # per score: psi (mul, add, log) if use_log, the division if progressive, then the MLP
        # (mul+add per weight, one op per ReLU); per-row normalizer costs are negligible.
        w = self.width
        per_score = (3 if self.use_log else 0) + (1 if self.progressive else 0)
        per_score += 3 * w + (self.depth - 1) * (2 * w * w + w) + 2 * w * self.num_heads_local
        return num_scores * per_score

    def log_values(self) -> dict[str, float]:
        return {"c": float(self.c.detach()), "L": float(self.L.detach())}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, width={self.width}, depth={self.depth}, init_L={self.init_L:g}, "
                f"eps={self.eps:g}, use_log={self.use_log}, use_threshold={self.use_threshold}, "
                f"progressive={self.progressive}, shared={self.shared_across_layers}")
