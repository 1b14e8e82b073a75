"""Learning rate as a pure function of the number of tokens trained on.

With ``tau`` = tokens consumed once the current step is done (``(step + 1) * tokens_per_step``),
peak rate ``eta``, warm-up length ``W`` tokens, run length ``N`` tokens and floor
``eta_min = min_lr_ratio * eta``::

    lr(tau) = eta * tau / W                                               tau <  W  (linear warm-up)
    lr(tau) = eta_min + (eta - eta_min) * (1 + cos(pi * p)) / 2,
              p = clamp((tau - W) / (N - W), 0, 1)                         tau >= W  (cosine decay)

Counting in tokens (not steps) keeps the schedule meaningful when the curriculum changes
the sequence length: tokens per step are constant, so a stage change moves ``tau`` by the
same amount as any other step and the rate is continuous across it. The first step trains
at ``eta * T / W`` rather than 0 (a zero-rate step would be wasted compute).
"""
from __future__ import annotations

import math


def lr_at_tokens(tokens_done: int, *, peak_lr: float, warmup_tokens: int, total_tokens: int,
                 min_lr_ratio: float) -> float:
    """The formula of the module docstring; ``tokens_done`` is ``tau``."""
    if warmup_tokens > 0 and tokens_done < warmup_tokens:
        return peak_lr * tokens_done / warmup_tokens
    min_lr = peak_lr * min_lr_ratio
    decay_tokens = total_tokens - warmup_tokens
    progress = 1.0 if decay_tokens <= 0 else min(max((tokens_done - warmup_tokens) / decay_tokens, 0.0), 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at_step(step: int, cfg) -> float:
    """The rate for 0-based optimizer step ``step`` of a run configured by ``cfg`` (a Config)."""
    t = cfg.train
    return lr_at_tokens((step + 1) * t.tokens_per_step, peak_lr=t.lr, warmup_tokens=t.warmup_tokens,
                        total_tokens=t.max_steps * t.tokens_per_step, min_lr_ratio=t.min_lr_ratio)
