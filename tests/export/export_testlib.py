"""Helpers for the export tests: tiny models written in the trainer's checkpoint layout.

Models are constructed directly (megafire.model.GPT, seeded) and saved exactly as
megafire.train.checkpoint lays them out (``ds/mp_rank_00_model_states.pt`` holding
``{"module": {"model.<key>": tensor}}`` next to meta.json and config.yaml), which is what
a DeepSpeed run writes (checked against a real run in test_export_trainer.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TRAIN_LENGTH = 16          # the "training length" recorded in the configs
EVAL_LENGTH = 48           # 3x the training length, 6x FIRE's L = 8
VOCAB = 384                # the test tokenizer's size (byte fallback needs > 260)

# case -> (encoding, options, model overrides)
CASES: dict[str, tuple[str, dict, dict]] = {
    "nope": ("nope", {}, {}),
    "learned": ("learned", {"max_positions": 64}, {}),
    "sinusoidal": ("sinusoidal", {}, {}),
    "rope": ("rope", {}, {}),
    "rope_linear": ("rope", {"scaling": "linear", "factor": 2.0}, {}),
    "rope_dynamic": ("rope", {"scaling": "dynamic", "factor": 2.0, "original_max_positions": TRAIN_LENGTH}, {}),
    "rope_yarn": ("rope", {"scaling": "yarn", "factor": 4.0, "original_max_positions": TRAIN_LENGTH}, {}),
    "rope_ntk": ("rope", {"scaling": "ntk", "factor": 2.0}, {}),
    "rope_partial": ("rope", {"partial_rotary_factor": 0.5}, {}),
    "alibi": ("alibi", {}, {}),
    "kerple_log": ("kerple_log", {}, {}),
    "kerple_power": ("kerple_power", {}, {}),
    "t5": ("t5", {"num_buckets": 8, "max_distance": 24}, {}),
    "fire": ("fire", {"init_L": 8.0}, {}),
    "fire_shared": ("fire", {"init_L": 8.0, "shared": True}, {}),
    "fire_untied_bias_mha": ("fire", {"init_L": 8.0}, {"tie_embeddings": False, "linear_bias": True,
                                                        "num_kv_heads": 4}),
}
LLAMA_CASES = {"rope", "rope_linear", "rope_dynamic", "rope_yarn"}


def tiny_config(case: str, run_dir: Path, tokenizer_dir: Path | None = None):
    from megafire.config import load_config
    name, options, model = CASES[case]
    data = {"seq_len": TRAIN_LENGTH}
    if tokenizer_dir is not None:
        data.update(tokenizer_dir=str(tokenizer_dir), shards_dir=str(tokenizer_dir / "no-shards"))
    return load_config(None, {
        "run": {"dir": str(run_dir)},
        "model": {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "init_std": 0.1, "position": {"name": name, "options": options}, **model},
        "data": data,
        "train": {"tokens_per_step": 4 * TRAIN_LENGTH, "seed": 7},
        "tracking": {"enabled": False},
    })


def perturb_(gpt, seed: int = 0) -> None:
    """Move the norm gains off 1 so that a swapped or dropped norm weight would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen).to(p.dtype))


def write_checkpoint(cfg, *, dtype: torch.dtype = torch.float32, step: int = 3, tokenizer_sha256=None) -> Path:
    """Build cfg's GPT (seeded), save it in the trainer's layout under cfg.run.dir; -> run dir."""
    from megafire.model import GPT
    from megafire.parallel import init_parallel
    run_dir = Path(cfg.run.dir)
    gpt = GPT(cfg.model, cfg.attention, init_parallel(1, 1), seed=cfg.train.seed)
    perturb_(gpt)
    gpt = gpt.to(dtype)
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    (ckpt / "ds").mkdir(parents=True)
    module = {f"model.{k}": v for k, v in gpt.state_dict().items()}
    torch.save({"module": module, "dp_world_size": 1, "mp_world_size": 1}, ckpt / "ds" / "mp_rank_00_model_states.pt")
    cfg.save(ckpt / "config.yaml")
    cfg.save(run_dir / "config.yaml")
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    meta = {"step": step, "tokens": step * cfg.train.tokens_per_step, "world_size": 1, "tp": 1, "pp": 1, "dp": 1,
            "zero_stage": 1 if precision == "bf16" else 0, "precision": precision,
            "tokenizer_sha256": tokenizer_sha256}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    return run_dir


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the error relative to the logits' scale."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def offline_env(hf_home: Path) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HOME"] = str(hf_home)
