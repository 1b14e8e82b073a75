"""Helpers shared by the trainer tests (imported by name: tests/train is on sys.path)."""
from __future__ import annotations

TINY = {
    "model": {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
              "position": {"name": "fire", "options": {"init_L": 16}}},
    "attention": {"backend": "reference"},
    "data": {"corpus": "synthetic"},
    "curriculum": {"stages": [{"seq_len": 16, "tokens": 256}, {"seq_len": 32, "tokens": 10_000}]},
    "train": {"max_steps": 6, "tokens_per_step": 128, "micro_batch_tokens": 64, "lr": 1e-2,
              "warmup_tokens": 256, "progress": False},
    "tracking": {"enabled": False},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_config(run_dir, overrides: dict | None = None):
    from megafire.config import load_config
    return load_config(None, _merge(_merge(TINY, {"run": {"dir": str(run_dir)}}), overrides or {}))


class Crash(RuntimeError):
    """Raised by a callback to simulate a job killed after a given step."""


def crash_after(step: int):
    def callback(trainer, record):
        if record["step"] == step:
            raise Crash(f"simulated kill after step {step}")
    return callback
