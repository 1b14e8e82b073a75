"""What the trainer needs from the layers below it: a model with a loss, a batch source,
the tokenizer's identity, and FLOP accounting for MFU."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import nn

from megafire.config import Config, ConfigError
from megafire.positional import PositionalEncoding


class BatchSource(Protocol):
    """A deterministic, resumable source of packed batches (dicts of [B, T] int64 tensors:
    input_ids, labels, positions, segment_ids)."""

    def next_batch(self, micro_batch_size: int, seq_len: int) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class DataBundle:
    source: BatchSource
    tokenizer_sha256: Optional[str] = None
    tokenizer_vocab_size: Optional[int] = None


class LanguageModelLoss(nn.Module):
    """The module DeepSpeed drives: ``forward(**batch) -> mean next-token loss``.

    DeepSpeed's engine hooks (ZeRO-3 gathering, timers) run around ``forward``; wrapping
    keeps the model's own ``forward`` (logits, used by eval and decoding) unchanged. The
    wrapped model's parameters therefore appear under ``model.`` in DeepSpeed checkpoints.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, labels, segment_ids=None) -> torch.Tensor:
        return self.model.loss(input_ids, positions, labels, segment_ids)


def build_model(cfg: Config, ctx) -> nn.Module:
    """The GPT of ``cfg.model`` for this rank (seeded by train.seed; same init on every DP rank)."""
    from megafire.model import GPT
    return GPT.from_config(cfg, ctx)


def build_data(cfg: Config, ctx) -> DataBundle:
    """``data.corpus: synthetic`` -> :class:`SyntheticBatches`; otherwise the megafire.data loader."""
    if cfg.data.corpus == "synthetic":
        from .synthetic import SyntheticBatches
        return DataBundle(SyntheticBatches(cfg.model.vocab_size, seed=cfg.train.seed, dp_rank=ctx.dp_rank,
                                           dp_size=ctx.dp_size))
    from .data_adapter import build_loader
    return build_loader(cfg, ctx)


def check_vocab(cfg: Config, data: DataBundle) -> None:
    """Fail before training when the tokenizer and the model disagree on the vocabulary."""
    n = data.tokenizer_vocab_size
    if n is not None and n != cfg.model.vocab_size:
        raise ConfigError(f"vocabulary mismatch: model.vocab_size={cfg.model.vocab_size} but the tokenizer "
                          f"(sha256 {str(data.tokenizer_sha256)[:12]}) has {n} pieces; set "
                          f"--model.vocab_size={n} or use the matching tokenizer")


def encodings_of(model: nn.Module) -> dict[str, PositionalEncoding]:
    """Module path -> encoding, each shared instance once."""
    found: dict[int, tuple[str, PositionalEncoding]] = {}
    for name, module in model.named_modules():
        if isinstance(module, PositionalEncoding) and id(module) not in found:
            found[id(module)] = (name, module)
    return {name: enc for name, enc in found.values()}


def encoding_log_values(encodings: dict[str, PositionalEncoding]) -> dict[str, float]:
    """``pos/<module path>/<name>`` -> value, from each encoding's ``log_values()`` (FIRE: c, L)."""
    out = {}
    for path, enc in encodings.items():
        short = path.removeprefix("module.").removeprefix("model.")
        for key, value in enc.log_values().items():
            out[f"pos/{short}/{key}"] = float(value)
    return out


# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "B200": 2250e12}


def peak_flops_per_device(precision: str) -> Optional[float]:
    """Known peak for this GPU in bf16/fp16, else None (CPU, fp32: MFU is not reported)."""
    if precision not in ("bf16", "fp16") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def train_flops_per_token(model: nn.Module, seq_len: int) -> Optional[float]:
    """Training FLOPs per token (megafire.flops: matmuls, attention and the encoding's own
    work, forward x3), or None for a model that is not a megafire GPT."""
    if not (hasattr(model, "config") and hasattr(model, "encodings") and hasattr(model, "parallel")):
        return None
    from megafire.flops import model_flops_per_token
    return model_flops_per_token(model, seq_len).train
