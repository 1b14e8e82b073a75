"""Tiny training runs for the trainer tests: a 2-layer FIRE GPT on synthetic data, in-process.

``tiny_config(run_dir, **overrides)`` -> Config. Runs take ~1 s per step on 2 cores, so the
tests keep to a handful of steps. Imports of megatron/DeepSpeed (~20 s) happen once per
session since the runs share the process.
"""
from __future__ import annotations

import pytest

from _train_util import tiny_config


@pytest.fixture
def make_config(tmp_path):
    def make(name: str = "run", overrides: dict | None = None):
        return tiny_config(tmp_path / name, overrides)
    return make
