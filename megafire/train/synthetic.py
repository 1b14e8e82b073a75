"""A synthetic batch source (``data.corpus: synthetic``): benchmarks and trainer tests.

Same batch dict and resumable-state contract as the real loader: ``input_ids``,
``labels`` (next tokens), ``positions`` (0-based within each packed document) and
``segment_ids`` ([B, T] int64). Each sequence packs two "documents"; document ``d`` is
the arithmetic progression ``x_t = (a_d + t * b_d) mod V``, so the loss can fall well below
``log V`` (the model must infer ``b_d`` in context). Micro-batch ``n`` of data-parallel
rank ``r`` is drawn from a generator seeded by ``(seed, n * dp + r)``: the state is the
counter ``n`` alone, and batches do not depend on what was drawn before.
"""
from __future__ import annotations

import numpy as np
import torch


class SyntheticBatches:
    """``next_batch(micro_batch_size, seq_len)``, ``state_dict()``, ``load_state_dict()``."""

    def __init__(self, vocab_size: int, *, seed: int = 0, dp_rank: int = 0, dp_size: int = 1):
        self.vocab_size, self.seed, self.dp_rank, self.dp_size = vocab_size, seed, dp_rank, dp_size
        self.micro_batches = 0

    def next_batch(self, micro_batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.micro_batches * self.dp_size + self.dp_rank])
        self.micro_batches += 1
        b, t = micro_batch_size, seq_len + 1          # one extra token for the shifted labels
        cut = rng.integers(1, t - 1, size=b)           # second document starts at `cut`
        idx = np.arange(t)[None, :]
        second = idx >= cut[:, None]
        pos = np.where(second, idx - cut[:, None], idx)
        start = rng.integers(0, self.vocab_size, size=(b, 2))
        stride = rng.integers(1, 8, size=(b, 2))
        doc = second.astype(np.int64)
        tokens = (np.take_along_axis(start, doc, 1) + pos * np.take_along_axis(stride, doc, 1)) % self.vocab_size
        labels = tokens[:, 1:].copy()
        labels[second[:, 1:] & ~second[:, :-1]] = -100   # no target across a document boundary
        return {"input_ids": torch.from_numpy(tokens[:, :-1].copy()),
                "labels": torch.from_numpy(labels),
                "positions": torch.from_numpy(pos[:, :-1].copy()),
                "segment_ids": torch.from_numpy(doc[:, :-1].copy())}

    def state_dict(self) -> dict:
        return {"micro_batches": self.micro_batches, "seed": self.seed, "dp_rank": self.dp_rank,
                "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        self.micro_batches = int(state["micro_batches"])
