"""Helpers for the parallel tests: tiny configs, layouts, a 2-process gloo job runner.

Imported by name (tests/parallel is on sys.path through pytest's rootdir-relative import).
Every multi-process test spawns ONE job that loops over what it checks, because the cost is
in process start-up and imports (~20 s), not in the tiny models.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
ENCODINGS = {   # the six families, with options that suit 16-32 token training
    "fire": {"init_L": 8.0},
    "rope": {},
    "alibi": {},
    "kerple": {},
    "t5": {},
    "nope": {},
}

#: name -> parallel overrides, for a world of 2
LAYOUTS_2 = {
    "tp2": {"tp": 2, "zero_stage": 0},
    "pp2": {"pp": 2, "zero_stage": 1},
    "dp2-z1": {"zero_stage": 1},
    "dp2-z2": {"zero_stage": 2},
    "dp2-z3": {"zero_stage": 3},
}


#: name -> (encoding, parallel overrides, other config sections, reference run name): more
#: code paths, fewer encodings -- activation checkpointing, TP with ZeRO-1, a pipeline whose
#: sequence length changes mid-run (curriculum: DeepSpeed's dynamic_shape)
PERF_ON = {"compile": "true", "fused_loss": "true", "direct_linear": True}
CURRICULUM = {"curriculum": {"stages": [{"seq_len": 16, "tokens": 128}, {"seq_len": 32, "tokens": 1000}]}}
EXTRA_2 = {
    "tp2-z1-ac": ("fire", {"tp": 2, "zero_stage": 1, "activation_checkpointing": True}, {}, "ref-fire"),
    "pp2-ac": ("t5", {"pp": 2, "zero_stage": 1, "activation_checkpointing": True}, {}, "ref-t5"),
    "dp2-z3-ac": ("fire", {"zero_stage": 3, "activation_checkpointing": True}, {}, "ref-fire"),
    "pp2-curriculum": ("fire", {"pp": 2, "zero_stage": 1}, CURRICULUM, "ref-curriculum-fire"),
    "tp2-curriculum": ("fire", {"tp": 2}, CURRICULUM, "ref-curriculum-fire"),
    "pp2-untied": ("fire", {"pp": 2, "zero_stage": 1}, {"model": {"tie_embeddings": False}}, "ref-untied-fire"),
    "pp2-learned": ("learned", {"pp": 2, "zero_stage": 1}, {}, "ref-learned"),
    "tp2-learned": ("learned", {"tp": 2}, {}, "ref-learned"),
    # the perf switches forced on (auto is off on CPU): compiled blocks inside pipeline stages and
    # under data-parallel ZeRO-1 train as the single uncompiled process does
    "pp2-compiled": ("fire", {"pp": 2, "zero_stage": 1}, {"perf": PERF_ON}, "ref-fire"),
    "dp2-z1-compiled": ("rope", {"zero_stage": 1}, {"perf": PERF_ON}, "ref-rope"),
}
#: reference (single-process) runs of EXTRA_2 beyond ref-<encoding>: name -> (encoding, sections)
EXTRA_REFS = {"ref-curriculum-fire": ("fire", CURRICULUM),
              "ref-untied-fire": ("fire", {"model": {"tie_embeddings": False}}),
              "ref-learned": ("learned", {})}


def tiny(run_dir, encoding: str = "fire", parallel: dict | None = None, sections: dict | None = None,
         **train) -> "Config":
    """A 2-layer, 2-head GPT on synthetic data; grad_clip 0.05 so that clipping is active
    (the clipping paths differ per layout and must agree too). Micro-batches of 32 tokens:
    one process accumulates 2 (the batches that DP=2's two ranks draw, in the same order),
    TP=2 and PP=2 also run 2 micro-batches per step (the pipeline schedule fills)."""
    from megafire.config import load_config
    options = ENCODINGS.get(encoding, {})
    name = "kerple_log" if encoding == "kerple" else encoding
    data = {
        "run": {"dir": str(run_dir)},
        "model": {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                  "position": {"name": name, "options": dict(options)}},
        "attention": {"backend": "reference"},
        "data": {"corpus": "synthetic", "seq_len": 16},
        "train": {"max_steps": 4, "tokens_per_step": 64, "micro_batch_tokens": 32, "lr": 1e-2, "grad_clip": 0.05,
                  "progress": False, **train},
        "parallel": dict(parallel or {}),
        "tracking": {"enabled": False},
    }
    for key, value in (sections or {}).items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    return load_config(None, data)


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(script: str, nprocs: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run tests/parallel/<script> under torchrun (gloo, one thread per process)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nprocs),
           str(Path(__file__).parent / script), *args]
    return subprocess.run(cmd, env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=timeout)


def clean_env(**extra) -> dict:
    """This environment minus the rendezvous variables an in-process run leaves behind
    (init_distributed sets MASTER_PORT: a child reusing it collides with the old store)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    return env


def failure_report(proc: subprocess.CompletedProcess) -> str:
    """The error lines of every rank, then the tail (torchrun's own summary buries the cause)."""
    text = proc.stdout + proc.stderr
    errors = [line for line in text.splitlines() if "Error" in line and "Warning" not in line][:40]
    return "\n".join(errors) + "\n...\n" + text[-3000:]
