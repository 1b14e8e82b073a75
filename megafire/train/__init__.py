"""Training: DeepSpeed engine set-up, loop, curriculum, checkpoints, LR by tokens.

Public entry points (imported lazily so ``megafire train --help`` stays cheap):
``train(cfg)`` (megafire.train.loop), ``load_model(run_dir_or_checkpoint)`` and
``load_run_config(run_dir)`` (megafire.train.load) for evaluation and export.
"""
from __future__ import annotations


def train(cfg, **kwargs):
    from .loop import train as _train
    return _train(cfg, **kwargs)


def load_model(path, **kwargs):
    from .load import load_model as _load
    return _load(path, **kwargs)
