"""A real (2-step) DeepSpeed run, fp32 / ZeRO-0 and bf16 / ZeRO-1, exports and agrees with transformers.

Guards the assumption the other export tests build on: that they write checkpoints in the
layout the trainer writes.
"""
from __future__ import annotations

import pytest
import torch

from export_testlib import EVAL_LENGTH, relative_diff


@pytest.mark.parametrize("precision,zero", [("fp32", 0), ("bf16", 1)])
def test_trained_run_exports(precision, zero, tmp_path):
    import megafire
    from megafire.config import load_config
    from megafire.export import consolidated_state_dict, export_checkpoint
    from megafire.train import train
    from transformers import AutoModelForCausalLM
    cfg = load_config(None, {
        "run": {"dir": str(tmp_path / "run")},
        "model": {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                  "position": {"name": "fire", "options": {"init_L": 8}}},
        "attention": {"backend": "reference"}, "data": {"corpus": "synthetic", "seq_len": 16},
        "train": {"max_steps": 2, "tokens_per_step": 64, "precision": precision, "progress": False, "lr": 1e-2},
        "parallel": {"zero_stage": zero}, "tracking": {"enabled": False}})
    train(cfg)
    _, state = consolidated_state_dict(tmp_path / "run")
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert {v.dtype for v in state.values()} == {want}
    hf_dir = export_checkpoint(tmp_path / "run", tmp_path / "hf")       # synthetic data: no tokenizer files
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
    x = torch.randint(4, 64, (2, EVAL_LENGTH))
    with torch.no_grad():
        ours = megafire.load_checkpoint(tmp_path / "run", dtype=torch.float32)(x)
        assert relative_diff(hf(x).logits, ours) <= 1e-4
