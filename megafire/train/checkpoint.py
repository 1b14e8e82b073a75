"""Atomic, self-describing checkpoints: DeepSpeed's state plus ours.

Layout under ``{run.dir}/checkpoints``::

    step_00000100/
        ds/                          DeepSpeed: model (+ optimizer / ZeRO shards), per model-parallel rank
        trainer_state_rank00000.pt   per rank: loader state, RNG states, step, tokens, stage
        meta.json                    step, tokens, stage, seq_len, world layout, tokenizer sha256
        config.yaml                  the resolved config of the run
    latest                           text: the name of the newest complete checkpoint
    .tmp-step_00000200/              only while a checkpoint is being written

Commit protocol: everything is written into ``.tmp-<name>``; after a barrier rank 0
renames it to ``<name>`` (one atomic rename on a POSIX file system), then replaces
``latest`` (written to a temp file and renamed), then prunes old checkpoints. A kill at
any point leaves ``latest`` naming a complete checkpoint; a leftover temp directory is
ignored by readers and removed by the next writer. ``run.dir`` must be on a file system
that every rank sees (the usual cluster set-up).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

LATEST = "latest"
DS_TAG = "ds"
TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    """Checkpoints are named by the number of optimizer steps done (= the step to resume at)."""
    return f"step_{step:08d}"


def rank_state_file(rank: int) -> str:
    return f"trainer_state_rank{rank:05d}.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temp directories excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The checkpoint ``latest`` names; if that is missing, the newest complete one; else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / "meta.json").is_file():
            return target
    complete = [p for p in list_checkpoints(root) if (p / "meta.json").is_file()]
    return complete[-1] if complete else None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def remove_stale_temps(root: str | Path) -> None:
    """Delete temp directories left by killed writes (rank 0, when no write is in progress)."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def save_checkpoint(engine, root: str | Path, *, step: int, meta: dict, rank_state: dict, config_yaml: str,
                    keep: int, rank: int, barrier: Callable[[], None],
                    before_commit: Optional[Callable[[Path], None]] = None) -> Path:
    """Write checkpoint ``step`` with the commit protocol of the module docstring (all ranks call this).

    ``before_commit(tmp_dir)`` runs on rank 0 after everything is written and before the
    rename (tests use it to simulate a kill at the worst moment).
    """
    root = Path(root)
    name = checkpoint_name(step)
    tmp, final = root / f"{TMP_PREFIX}{name}", root / name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(root)
        tmp.mkdir()
    barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
    torch.save(rank_state, tmp / rank_state_file(rank))
    barrier()
    if rank == 0:
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "saved_at": time.time()}, indent=1))
        if before_commit is not None:
            before_commit(tmp)
        if final.exists():   # re-saving the same step (e.g. a final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(root / LATEST, name + "\n")
        prune_checkpoints(root, keep)
    barrier()
    return final


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints (never the one ``latest`` names)."""
    if keep <= 0:
        return
    current = latest_checkpoint(root)
    for old in list_checkpoints(root)[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine, ckpt_dir: str | Path, *, rank: int) -> tuple[dict, dict]:
    """Restore DeepSpeed's state into ``engine``; return (meta, this rank's trainer state)."""
    ckpt_dir = Path(ckpt_dir)
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    state_path = ckpt_dir / rank_state_file(rank)
    if not state_path.is_file():
        raise RuntimeError(f"checkpoint {ckpt_dir} has no state for rank {rank}: it was written by "
                           f"{meta.get('world_size')} ranks; resume with the same world size")
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False, load_module_strict=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt_dir / DS_TAG}")
    return meta, torch.load(state_path, map_location="cpu", weights_only=False)
