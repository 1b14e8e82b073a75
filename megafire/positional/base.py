"""The position-encoding interface shared by every encoding.

An encoding is one of four kinds, and the attention code only ever asks the question that
its kind answers:

* ``none``      -- contributes nothing (NoPE).
* ``absolute``  -- ``embed(x, positions) -> x + p(positions)`` on the token embeddings.
* ``rotary``    -- ``rotate(q, k, q_pos, k_pos) -> (q', k')`` before the dot product.
* ``bias``      -- ``bias(q_pos, k_pos) -> b[h, i, j]`` added (fp32) to ``q.k / sqrt(d)``.

Positions are explicit 0-based integer tensors from the data loader (never ``arange``
inside a layer): packed documents reset them, KV-cache decoding offsets them and FIRE
normalizes by the absolute query position ``i``. A position tensor is either ``[T]``
(shared by the batch) or ``[B, T]``; a bias for ``[B, T]`` positions is ``[B, H, Tq, Tk]``.

Tensor parallelism: an encoding built with ``tp_rank``/``tp_size`` owns the contiguous
head range ``[head_start, head_start + num_heads_local)`` and computes only those heads.
Parameters that every TP rank holds a full copy of (FIRE's hidden layer, c and L; Kerple
has none, its r1/r2 are per head) are flagged with ``param.megafire_tp_replicated = True``
so the parallel layer can all-reduce their (partial) gradients over the TP group.

Scores beyond the causal diagonal (j > i) are masked by the attention code; a bias must
still be finite there.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn

KINDS = ("none", "absolute", "rotary", "bias")


def mark_tp_replicated(module_or_param) -> None:
    """Flag parameters that are replicated (not sharded) across tensor-parallel ranks."""
    params = [module_or_param] if isinstance(module_or_param, nn.Parameter) else module_or_param.parameters()
    for p in params:
        p.megafire_tp_replicated = True


class PositionalEncoding(nn.Module):
    """Base class. Subclasses set ``name`` and ``kind`` and implement the method of their kind."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "none"
    #: Buffers that must stay fp32 even when the module is cast (``.bfloat16()``, DeepSpeed
    #: bf16): RoPE's inv_freq and ALiBi's slopes lose digits that matter in bf16.
    fp32_buffers: ClassVar[tuple[str, ...]] = ()
    #: True when one instance is meant to serve every layer (T5 bias, FIRE-S).
    shared_across_layers: bool = False

    def __init__(self, num_heads: int, head_dim: int, *, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if num_heads <= 0 or head_dim <= 0:
            raise ValueError(f"num_heads and head_dim must be positive, got {num_heads}, {head_dim}")
        if tp_size <= 0 or not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, tp_size), got tp_rank={tp_rank}, tp_size={tp_size}")
        if num_heads % tp_size:
            raise ValueError(f"num_heads={num_heads} is not divisible by tp_size={tp_size}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.num_heads_local = num_heads // tp_size
        self.head_start = tp_rank * self.num_heads_local

    def _apply(self, fn, recurse=True):
        # Let fn move the fp32 buffers (device), then put back the un-rounded fp32 values
        # there: casting to bf16 and back would lose the digits.
        kept = {n: self._buffers[n] for n in self.fp32_buffers if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, buf in kept.items():
            moved = self._buffers[name]
            if moved.dtype != torch.float32:
                self._buffers[name] = buf.to(device=moved.device, dtype=torch.float32)
        return self

    # --- kind-specific entry points -------------------------------------------------
    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """absolute: x [B, T, hidden], positions [T] or [B, T] -> x + p(positions)."""
        raise NotImplementedError(f"encoding {self.name!r} of kind {self.kind!r} has no embed()")

    def rotate(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
        """rotary: q [B, Tq, Hq, D], k [B, Tk, Hk, D] -> rotated (q, k), same shapes and dtypes."""
        raise NotImplementedError(f"encoding {self.name!r} of kind {self.kind!r} has no rotate()")

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """bias: q_pos [Tq] | [B, Tq], k_pos [Tk] | [B, Tk] -> fp32 [H_local, Tq, Tk] | [B, H_local, Tq, Tk]."""
        raise NotImplementedError(f"encoding {self.name!r} of kind {self.kind!r} has no bias()")

    # --- accounting and logging --------------------------------------------------------
    def flops(self, num_scores: int, num_tokens: int) -> int:
        """Forward FLOPs of the encoding's own work (not the attention matmuls).

        ``num_scores``: (query, key) pairs evaluated over the local heads' shared bias
        (B * Tq * Tk for a per-batch bias, Tq * Tk for a shared one); ``num_tokens``: B * T.
        """
        return 0

    def log_values(self) -> dict[str, float]:
        """Scalars worth tracking during training (FIRE: c and L)."""
        return {}

    def extra_repr(self) -> str:
        return (f"name={self.name}, kind={self.kind}, heads={self.num_heads_local}/{self.num_heads}"
                f" (from {self.head_start}), head_dim={self.head_dim}")


def relative_positions(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """i - j as int64: [Tq, Tk] for 1-D positions, [B, Tq, Tk] for 2-D ones."""
    if q_pos.dim() != k_pos.dim() or q_pos.dim() not in (1, 2):
        raise ValueError(f"q_pos and k_pos must both be [T] or [B, T], got {tuple(q_pos.shape)}, {tuple(k_pos.shape)}")
    return q_pos.long().unsqueeze(-1) - k_pos.long().unsqueeze(-2)


def local_generator() -> torch.Generator:
    """A CPU generator seeded by one draw from the global RNG.

    Per-head parameters are initialized for *all* heads from it and then sliced to the local
    heads, so the tp_size shards concatenate to the tp_size=1 initialization under the same
    global seed, and the global RNG advances by the same amount whatever tp_size is.
    """
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(seed)


def check_kind(kind: Optional[str]) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown encoding kind {kind!r}; allowed: {', '.join(KINDS)}")
    return kind
