"""Checkpoints -> a single-process model for evaluation, decoding and export.

``load_model(path)`` accepts a run directory (its ``checkpoints/latest`` is used) or one
checkpoint directory (``checkpoints/step_XXXXXXXX``). Weights come back in fp32: from the
model states for ZeRO-0, and from the fp32 master copy in the optimizer shards for ZeRO
1-3 (DeepSpeed's ``zero_to_fp32``), so a bf16 run evaluates with its exact master weights.
Tensor- and pipeline-parallel checkpoints are merged by megafire.train.universal.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from megafire.config import Config, load_config

from . import checkpoint as ckpt

MODULE_PREFIX = "model."   # LanguageModelLoss wraps the GPT as `.model`


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory or checkpoint directory -> the checkpoint directory."""
    return ckpt.resolve_for_reading(path)


def load_run_config(path: str | Path) -> Config:
    """The resolved config a checkpoint (or run directory) was trained with; ``run.dir`` is set
    to the run directory where it lies now (runs may be moved after training)."""
    ckpt_dir = resolve_checkpoint(path)
    cfg = load_config(ckpt_dir / "config.yaml")
    cfg.run.dir = str(ckpt_dir.parent.parent)
    return cfg


def load_state_dict(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """(config, fp32 state dict of the TP=1 GPT) from a checkpoint, run or universal directory
    of any layout (tp / pp / ZeRO 0-3): megafire.train.universal.consolidated_state_dict."""
    from .universal import consolidated_state_dict
    return consolidated_state_dict(path)


def load_model(path: str | Path, *, device: str | torch.device = "cpu", with_config: bool = False,
               parallel=None, allow_nonfinite: bool = False):
    """A GPT in eval mode with the checkpoint's fp32 weights (``model(input_ids, positions)``).

    Builds on ``parallel`` (a ParallelContext), else on a single-process world that is
    initialized here if none exists (megatron's layers want process groups even at tp=1).
    Returns the model, or ``(model, config)`` with ``with_config=True``. Weights holding a NaN or
    inf (a diverged run) are refused, naming the tensor, unless ``allow_nonfinite``.
    """
    from megafire.model import GPT
    cfg, state = load_state_dict(path)
    ckpt.check_finite(state, path, allow_nonfinite)
    if parallel is None:
        from megafire.parallel import init_parallel
        parallel = init_parallel(1, 1)
    model = GPT.from_config(cfg, parallel)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model of its config: missing {missing}, "
                           f"unexpected {unexpected}")
    model = model.to(device).eval()
    return (model, cfg) if with_config else model


def latest_step(path: str | Path) -> Optional[int]:
    """Optimizer steps done in the newest checkpoint of a run directory (None without one)."""
    found = ckpt.latest_checkpoint(Path(path) / "checkpoints")
    return None if found is None else int(json.loads((found / "meta.json").read_text())["step"])
