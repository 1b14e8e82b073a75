"""Length generalization: perplexity against evaluation length.

For each length ``L`` the evaluation set holds one window per held-out document, starting
at the document's first token, as at training time where a document follows an EOS
separator: the model reads ``[EOS] + d[:L-1]`` at positions ``0..L-1`` and is scored on
``d[:L]`` (``megafire.data.loader.long_document_windows``). Only documents of at least
``max(lengths)`` tokens are used, so every length scores a prefix of the *same* documents
and the curve is not confounded by which documents are long:

    ppl(L) = exp( (1 / (N L)) * sum_{n=1..N} sum_{t=0..L-1} -log p(d_n[t] | EOS, d_n[:t]) )

The per-position mean NLL (over documents) shows *where* past the training length a model
starts to fail, which one number per length hides.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from megafire.config import ConfigError

# logits = forward(input_ids [B, T], positions [B, T]) -> [B, T, V]
ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def window_nll(forward: ForwardFn, input_ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
               batch_size: int = 1) -> torch.Tensor:
    """input_ids/labels/positions [N, L] -> per-token NLL [N, L] (float64, CPU)."""
    n, length = input_ids.shape
    out = torch.empty(n, length, dtype=torch.float64)
    for s in range(0, n, batch_size):
        logits = forward(input_ids[s:s + batch_size], positions[s:s + batch_size]).float()  # [b, L, V]
        y = labels[s:s + batch_size].to(logits.device)
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        out[s:s + y.size(0)] = nll.view(y.size(0), length).double().cpu()
    return out


def perplexity_by_length(forward: ForwardFn, docs_tokens: Sequence[np.ndarray], lengths: Sequence[int], *,
                         eos_id: int, max_windows: int | None = None, batch_size: int = 1,
                         per_position: bool = False) -> dict:
    """-> {"perplexity": {L: ppl}, "num_windows": {L: N}, "tokens": {L: N*L},
    "per_position_nll": {L: [...]} (if asked)}."""
    from megafire.data.loader import long_document_windows
    lengths = sorted({int(x) for x in lengths})
    longest = lengths[-1]
    result: dict = {"perplexity": {}, "num_windows": {}, "tokens": {}}
    if per_position:
        result["per_position_nll"] = {}
    for length in lengths:
        w = long_document_windows(docs_tokens, length, eos_id=eos_id, min_doc_tokens=longest,
                                  max_windows=max_windows)
        if w["input_ids"].size(0) == 0:
            have = max((len(d) for d in docs_tokens), default=0)
            raise ConfigError(f"no held-out document has {longest} tokens (the longest has {have}): "
                             f"evaluate at shorter lengths or with longer documents")
        nll = window_nll(forward, w["input_ids"], w["labels"], w["positions"], batch_size)  # [N, L]
        result["perplexity"][length] = math.exp(nll.mean().item())
        result["num_windows"][length] = int(nll.size(0))
        result["tokens"][length] = int(nll.numel())
        if per_position:
            result["per_position_nll"][length] = [round(v, 5) for v in nll.mean(0).tolist()]
    return result
