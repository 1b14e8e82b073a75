"""The model hands the run's ``attention.fused_kernels`` to the fused kernels when it is built."""
from __future__ import annotations

from model_testlib import tiny_config

from megafire.attention import kernel_options
from megafire.model import GPT


def test_each_model_built_sets_its_runs_kernel_options(parallel):
    """A model built from a config with options sets them for the kernels; the next model built
    without (the next arm of ``megafire bench train``, the next run in the process) restores the
    committed ones."""
    cfg = tiny_config("t5")
    cfg.attention.fused_kernels = {"16": {"t5_diag": True, "onepass": False}}
    try:
        GPT.from_config(cfg, parallel, seed=0)
        assert kernel_options.run_overrides(16) == {"t5_diag": True, "onepass": None}
        assert kernel_options.run_overrides(64) == {}
        GPT.from_config(tiny_config("t5"), parallel, seed=0)
        assert kernel_options.run_overrides(16) == {}
    finally:
        kernel_options.set_run_overrides({})


def test_changed_options_empty_dynamos_caches(monkeypatch):
    """A compiled block traced under other options must not be reused: a change resets dynamo,
    setting the same options again does not."""
    import torch._dynamo
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    try:
        kernel_options.set_run_overrides({})
        kernel_options.set_run_overrides({})
        assert resets == []
        kernel_options.set_run_overrides({64: {"t5_diag": False}})
        kernel_options.set_run_overrides({"64": {"t5_diag": 0}})      # the same options, spelt otherwise
        assert resets == [1]
    finally:
        kernel_options.set_run_overrides({})
    assert resets == [1, 1]
