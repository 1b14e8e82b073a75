"""KERPLE: kernelized relative positional embeddings (Chi et al., 2022).

With ``d = i - j >= 0`` and per-head learnable ``r1, r2 > 0``:

* log variant:   ``b_h(i, j) = -r1_h * log(1 + r2_h * d)``
* power variant: ``b_h(i, j) = -r1_h * d^r2_h`` with ``0 < r2_h <= 2``

Constraints are built into the parametrization (raw parameters ``r1_raw``, ``r2_raw``), so
they hold after any optimizer step, whatever the learning rate:

* ``r1 = R_MIN + softplus(r1_raw)`` (both variants), log ``r2 = R_MIN + softplus(r2_raw)``;
* power ``r2 = 2 - (2 - R_MIN) * sigmoid(-r2_raw)``, in ``[R_MIN, 2]``.

(The reference code clamps the raw values in place instead; a reparametrization keeps a
non-zero gradient at the bounds and needs no hook after the optimizer step.) ``R_MIN =
1e-4`` keeps the values strictly positive even where softplus/sigmoid underflow.

Initialization follows the reference code: ``r1 ~ U(0, 2)``, ``r2 ~ U(0, 1)`` per head,
drawn for all heads from a local generator and sliced, so TP shards concatenate to the TP=1
values. ``.r1`` / ``.r2`` are the effective values ``[H_local]`` the fused kernels read.
For ``j > i`` (masked) ``d`` is clamped to 0: the bias is 0 there.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import PositionalEncoding, local_generator, relative_positions

R_MIN = 1e-4


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))  # log(exp(y) - 1), stable for large y


class _Kerple(PositionalEncoding):
    kind = "bias"
    R2_MAX: Optional[float] = None  # upper bound of r2, None = unbounded

    def __init__(self, num_heads: int, head_dim: int, *, tp_rank: int = 0, tp_size: int = 1):
        super().__init__(num_heads, head_dim, tp_rank=tp_rank, tp_size=tp_size)
        gen = local_generator()
        r1 = torch.rand(num_heads, generator=gen, dtype=torch.float64) * 2.0  # [H] all heads
        r2 = torch.rand(num_heads, generator=gen, dtype=torch.float64)
        self.r1_raw = nn.Parameter(torch.empty(self.num_heads_local))
        self.r2_raw = nn.Parameter(torch.empty(self.num_heads_local))
        local = slice(self.head_start, self.head_start + self.num_heads_local)
        self.set_values(r1[local].clamp_min(2 * R_MIN), r2[local].clamp_min(2 * R_MIN))

    # --- effective (constrained) parameters, [H_local] --------------------------------
    @property
    def r1(self) -> torch.Tensor:
        return R_MIN + F.softplus(self.r1_raw)

    @property
    def r2(self) -> torch.Tensor:
        if self.R2_MAX is None:
            return R_MIN + F.softplus(self.r2_raw)
        return self.R2_MAX - (self.R2_MAX - R_MIN) * torch.sigmoid(-self.r2_raw)

    @torch.no_grad()
    def set_values(self, r1, r2) -> None:
        """Set the raw parameters so that ``.r1``/``.r2`` equal the given (local-head) values."""
        r1 = torch.as_tensor(r1, dtype=torch.float64).expand(self.num_heads_local)
        r2 = torch.as_tensor(r2, dtype=torch.float64).expand(self.num_heads_local)
        hi = float("inf") if self.R2_MAX is None else self.R2_MAX
        if not (bool((r1 > R_MIN).all()) and bool((r2 > R_MIN).all()) and bool((r2 < hi).all())):
            raise ValueError(f"need r1 > {R_MIN} and {R_MIN} < r2 < {hi}, got r1={r1.tolist()}, r2={r2.tolist()}")
        self.r1_raw.copy_(_inverse_softplus(r1 - R_MIN))
        if self.R2_MAX is None:
            self.r2_raw.copy_(_inverse_softplus(r2 - R_MIN))
        else:
            s = (self.R2_MAX - r2) / (self.R2_MAX - R_MIN)  # = sigmoid(-raw)
            self.r2_raw.copy_(-torch.logit(s))

    def _kernel(self, dist: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(self.r1_raw.dtype, torch.float32)  # fp32, or fp64 in gradcheck
        dist = relative_positions(q_pos, k_pos).clamp_min(0).to(dtype).unsqueeze(-3)  # [(B,) 1, Tq, Tk]
        r1 = self.r1.to(dtype).view(-1, 1, 1)  # [H_local, 1, 1]
        r2 = self.r2.to(dtype).view(-1, 1, 1)
        return self._kernel(dist, r1, r2)  # [(B,) H_local, Tq, Tk]


class KerpleLog(_Kerple):
    name = "kerple_log"

    def _kernel(self, dist, r1, r2):
        return -r1 * torch.log1p(r2 * dist)

    def flops(self, num_scores: int, num_tokens: int) -> int:
        return num_scores * (1 + 4 * self.num_heads_local)  # i-j; mul, add, log, mul per head


class KerplePower(_Kerple):
    name = "kerple_power"
    R2_MAX = 2.0

    def _kernel(self, dist, r1, r2):
        # d^r2 as exp(r2 * log d) on d >= 1 and 0 at d = 0: pow's exponent gradient would be
        # 0 * log(0) = nan at d = 0.
        log_d = torch.log(dist.clamp_min(1.0))
        return torch.where(dist > 0, -r1 * torch.exp(r2 * log_d), torch.zeros((), dtype=dist.dtype))

    def flops(self, num_scores: int, num_tokens: int) -> int:
        return num_scores * (2 + 3 * self.num_heads_local)  # i-j, log d; mul, exp, mul per head
