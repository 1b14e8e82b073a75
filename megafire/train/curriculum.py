"""Progressive-length curriculum: a few (seq_len, tokens) stages at constant tokens per step.

Every optimizer step consumes the same global number of tokens ``T = train.tokens_per_step``.
Each data-parallel rank runs ``A`` micro-steps of ``m`` tokens (``A`` = gradient
accumulation, fixed for the run), so ``T = m * A * dp``. A stage of sequence length ``s``
packs a micro-step as ``b = m / s`` sequences, so a length change changes only the
micro-batch ``b`` and the loss is still a mean over ``T`` tokens with the same weighting.

Stage ``k`` with ``tokens_k`` lasts ``n_k = ceil(tokens_k / T)`` steps and starts at step
``first_k = n_0 + ... + n_{k-1}``. The last stage extends to ``train.max_steps`` if the
stages are shorter than the run; stages past ``max_steps`` are never reached. The stage of a
step is a pure function of the step, so a resumed run lands in the right stage by
construction.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from megafire.config import Config, ConfigError


@dataclass(frozen=True)
class Stage:
    """One stage as the training loop sees it."""
    index: int
    seq_len: int
    micro_batch_size: int     # sequences per micro-step per data-parallel rank
    first_step: int           # inclusive
    end_step: int             # exclusive (train.max_steps for the last stage)


class Curriculum:
    """The stages of a run, resolved against tokens per step, micro-batch and dp size."""

    def __init__(self, stages: list[tuple[int, int]], *, tokens_per_step: int, micro_batch_tokens: int,
                 dp_size: int, max_steps: int):
        if not stages:
            raise ConfigError("curriculum needs at least one stage")
        if tokens_per_step % (micro_batch_tokens * dp_size):
            raise ConfigError(
                f"train.tokens_per_step={tokens_per_step} must be a multiple of train.micro_batch_tokens * "
                f"data-parallel size = {micro_batch_tokens} * {dp_size}")
        self.tokens_per_step = tokens_per_step
        self.micro_batch_tokens = micro_batch_tokens
        self.grad_accum = tokens_per_step // (micro_batch_tokens * dp_size)
        self.dp_size = dp_size
        self.max_steps = max_steps
        self.stages: list[Stage] = []
        first = 0
        for i, (seq_len, tokens) in enumerate(stages):
            if micro_batch_tokens % seq_len:
                raise ConfigError(
                    f"curriculum.stages[{i}].seq_len={seq_len} must divide the per-rank micro-batch of "
                    f"{micro_batch_tokens} tokens (train.micro_batch_tokens, or train.tokens_per_step / dp)")
            if first >= max_steps:
                break   # never reached within train.max_steps
            last = i == len(stages) - 1
            end = max_steps if last else min(first + math.ceil(tokens / tokens_per_step), max_steps)
            self.stages.append(Stage(i, seq_len, micro_batch_tokens // seq_len, first, end))
            first = end
        if self.stages[-1].end_step < max_steps:   # stages shorter than the run: the last one extends
            s = self.stages[-1]
            self.stages[-1] = Stage(s.index, s.seq_len, s.micro_batch_size, s.first_step, max_steps)
        self._starts = [s.first_step for s in self.stages]

    @classmethod
    def from_config(cls, cfg: Config, dp_size: int) -> "Curriculum":
        t = cfg.train
        micro = t.micro_batch_tokens or t.tokens_per_step // dp_size
        if t.tokens_per_step % dp_size:
            raise ConfigError(f"train.tokens_per_step={t.tokens_per_step} must be divisible by the "
                              f"data-parallel size {dp_size}")
        return cls([(s.seq_len, s.tokens) for s in cfg.stages()], tokens_per_step=t.tokens_per_step,
                   micro_batch_tokens=micro, dp_size=dp_size, max_steps=t.max_steps)

    def stage_at(self, step: int) -> Stage:
        """The stage that 0-based optimizer step ``step`` trains in."""
        if not 0 <= step < self.max_steps:
            raise ValueError(f"step {step} is outside the run [0, {self.max_steps})")
        return self.stages[bisect.bisect_right(self._starts, step) - 1]

    def tokens_before(self, step: int) -> int:
        """Global tokens consumed by steps 0 .. step-1."""
        return step * self.tokens_per_step

    @property
    def train_length(self) -> int:
        """The longest sequence length reached within the run."""
        return max(s.seq_len for s in self.stages)

    def describe(self) -> str:
        return "; ".join(f"stage {s.index}: seq_len {s.seq_len} x micro-batch {s.micro_batch_size} x "
                         f"accum {self.grad_accum} x dp {self.dp_size}, steps [{s.first_step}, {s.end_step})"
                         for s in self.stages)
