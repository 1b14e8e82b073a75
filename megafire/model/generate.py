"""Greedy decoding with a KV cache."""
from __future__ import annotations

from typing import Optional

import torch

from .gpt import GPT


@torch.no_grad()
def generate(model: GPT, input_ids: torch.Tensor, max_new_tokens: int, *,
             positions: Optional[torch.Tensor] = None, eos_id: Optional[int] = None) -> torch.Tensor:
    """Greedy continuation: ``x_{t+1} = argmax_v logits(x_{<=t})``; returns [B, T + new].

    ``positions`` of the prompt default to ``0..T-1``; new tokens take the next positions.
    With ``eos_id``, a sequence that emitted it keeps emitting it; stops early when all have.
    """
    B, T = input_ids.shape
    if positions is None:
        positions = torch.arange(T, device=input_ids.device)                 # [T]
    was_training = model.training
    model.eval()
    cache = model.new_cache()
    logits = model(input_ids, positions, cache=cache)
    out, done = [input_ids], torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    pos = positions[..., -1:]                                                 # [1] | [B, 1]
    for _ in range(max_new_tokens):
        next_id = model.gather_logits(logits[:, -1:]).argmax(-1)             # [B, 1]
        if eos_id is not None:
            next_id = torch.where(done.unsqueeze(1), torch.full_like(next_id, eos_id), next_id)
            done |= next_id.squeeze(1) == eos_id
        out.append(next_id)
        if eos_id is not None and bool(done.all()):
            break
        pos = pos + 1
        logits = model(next_id, pos, cache=cache)
    model.train(was_training)
    return torch.cat(out, dim=1)
