"""KV cache for incremental decoding.

The cache holds, per layer, the keys (already rotated for rotary encodings) and values of
every token seen so far, plus those tokens' positions and segment ids, shared by all
layers. A forward with ``cache=`` first calls :meth:`KVCache.extend` with the new tokens'
positions (the model does this), then each layer calls :meth:`KVCache.update`; the new
queries are the last ``Tq`` of the ``Tk`` keys, which is the alignment of the attention
backends' causal mask (``j <= (Tk - Tq) + i``).
"""
from __future__ import annotations

from typing import Optional

import torch


def _cat_last(old: Optional[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    """Concatenate [T] / [B, T] tensors along T, broadcasting a [T] side to [B, T] if needed."""
    if old is None:
        return new
    if old.dim() != new.dim():
        batch = (old if old.dim() == 2 else new).shape[0]
        old, new = (t if t.dim() == 2 else t.unsqueeze(0).expand(batch, -1) for t in (old, new))
    return torch.cat([old, new], dim=-1)


class KVCache:
    """Per-layer keys/values ``[B, Tk, Hkv_local, D]`` plus key positions and segment ids."""

    def __init__(self, num_layers: int):
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers
        self.positions: Optional[torch.Tensor] = None      # [Tk] | [B, Tk]
        self.segment_ids: Optional[torch.Tensor] = None    # [B, Tk] | None

    def __len__(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    def extend(self, positions: torch.Tensor, segment_ids: Optional[torch.Tensor] = None) -> None:
        """Record the positions (and segment ids) of the tokens about to be appended."""
        if len(self) and (segment_ids is None) != (self.segment_ids is None):
            raise ValueError("segment ids must be given for every step of a cached decode, or for none")
        self.positions = _cat_last(self.positions, positions)
        if segment_ids is not None:
            self.segment_ids = _cat_last(self.segment_ids, segment_ids)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append k, v [B, T, Hkv, D] for ``layer`` -> (k_all, v_all, k_pos, segment_ids_k)."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=1)                  # [B, Tk, Hkv, D]
            v = torch.cat([self.values[layer], v], dim=1)
        if k.shape[1] != len(self):
            raise RuntimeError(f"layer {layer} holds {k.shape[1]} keys but the cache recorded {len(self)} "
                               f"positions: call extend() once per forward, before the layers")
        self.keys[layer], self.values[layer] = k, v
        return k, v, self.positions, self.segment_ids
