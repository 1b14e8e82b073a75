"""``load_checkpoint(path)``: a megafire model in eval mode, ready for evaluation and decoding.

``path`` is a run directory, a ``checkpoints/step_*`` directory, or a Hugging Face export
written by ``megafire export`` (it holds megafire_config.yaml). The result is a
:class:`LoadedModel`: ``model(input_ids [B, T]) -> logits [B, T, V]`` with positions
``0..T-1`` unless given, full (gathered) vocabulary, no gradient bookkeeping required.

The GPT is built on megatron-core's layers, which want a process group even in one
process: a single-process gloo world is initialized on first use when none exists
(megafire.parallel.init_parallel; TP = PP = 1).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .checkpoint import EXTRA_STATE_SUFFIX, checkpoint_dtype


class LoadedModel(nn.Module):
    """A thin wrapper: default positions, full-vocabulary logits, the run's config and tokenizer."""

    def __init__(self, gpt: nn.Module, config, tokenizer=None, source: Optional[Path] = None):
        super().__init__()
        self.gpt = gpt
        self.config = config
        self.tokenizer = tokenizer
        self.source = source

    @property
    def device(self) -> torch.device:
        return next(self.gpt.parameters()).device

    def forward(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]; positions [T] | [B, T], default ``arange(T)``."""
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        return self.gpt.gather_logits(self.gpt(input_ids, positions))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, eos_id: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding with the KV cache (megafire.model.generate): [B, T] -> [B, T + new]."""
        from megafire.model import generate
        return generate(self.gpt, input_ids, max_new_tokens, eos_id=eos_id)


def build_gpt(cfg, state: dict, *, dtype: Optional[torch.dtype] = None, fused_qkv: Optional[bool] = None) -> nn.Module:
    """A TP=1 GPT of ``cfg`` holding exactly ``state`` (strict: no missing or unexpected weights)."""
    from megafire.model import GPT
    from megafire.parallel import init_parallel
    dtype = dtype or checkpoint_dtype(state)
    fused = any(".attn.qkv." in k for k in state) if fused_qkv is None else fused_qkv
    ctx = init_parallel(1, 1)
    gpt = GPT(cfg.model, cfg.attention, ctx, seed=cfg.train.seed, params_dtype=dtype, fused_qkv=fused)
    expected = {k for k in gpt.state_dict() if not k.endswith(EXTRA_STATE_SUFFIX)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(f"checkpoint weights do not match the model of its config: missing {missing[:6]}, "
                       f"unexpected {unexpected[:6]}")
    gpt.load_state_dict({k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in state.items()},
                        strict=False)
    return gpt.to(dtype).eval()


def _read_source(path: Path):
    """(Config, GPT state dict, tokenizer.model path or None) from a checkpoint or an export."""
    from .export import EXPORT_CONFIG
    if (path / EXPORT_CONFIG).is_file() and (path / "config.json").is_file():
        from .importer import read_export
        cfg, state, _ = read_export(path)
        tok = path / "tokenizer.model"
        return cfg, state, tok if tok.is_file() else None
    from .checkpoint import consolidated_state_dict, resolve_checkpoint
    from .export import find_tokenizer
    info = resolve_checkpoint(path)
    cfg, state = consolidated_state_dict(info.path)
    return cfg, state, find_tokenizer(info, cfg)


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
                    backend: Optional[str] = None, allow_nonfinite: bool = False) -> LoadedModel:
    """Load ``path`` (run dir, step dir or HF export) as a :class:`LoadedModel` in eval mode.

    ``dtype``: the weights' dtype (default: as stored); ``backend``: override
    ``attention.backend`` (e.g. "reference" for the oracle). Weights holding a NaN or inf are
    refused (CheckpointError naming the tensor) unless ``allow_nonfinite``.
    """
    from megafire.train.checkpoint import check_finite
    path = Path(path)
    cfg, state, tok_path = _read_source(path)
    check_finite(state, path, allow_nonfinite)
    if backend is not None:
        cfg.attention.backend = backend
    gpt = build_gpt(cfg, state, dtype=dtype).to(device)
    tokenizer = None
    if tok_path is not None:
        from megafire.data.tokenizer import Tokenizer
        tokenizer = Tokenizer(tok_path)
    return LoadedModel(gpt, cfg, tokenizer, path).eval()
