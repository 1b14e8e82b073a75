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
``latest`` (written to a temp file and renamed), then prunes old checkpoints (each renamed to
a temporary name before it is deleted, as is a checkpoint being re-written). A kill at any
point leaves ``latest`` naming a complete checkpoint (during the first write it may not exist
yet: readers then take the newest complete one) and no partial directory under a
checkpoint's name (tests/parallel/test_parallel_kill.py kills at every file-system operation
of a write); a leftover temp directory is ignored by readers and removed by the next writer.
``run.dir`` must be on a file system that every rank sees (the usual cluster set-up).

Every reader (resume, ``--init-from``, eval, export, megafire.train.universal) checks a
checkpoint with :func:`verify_checkpoint` before it loads anything: a missing, empty or
truncated file raises :class:`CheckpointError` naming the checkpoint and the file. When
``latest`` names a damaged checkpoint, :func:`find_checkpoint` refuses (resume, by default)
or skips it with a warning saying which and why (``fallback=True``: readers, and resume with
``train.resume_fallback=true``, which also moves it aside as ``step_X.damaged-<time>`` so that
the resumed run never overwrites its files; pruning ignores such directories).
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

from megafire.config import ConfigError, MissingFileError

LATEST = "latest"
DS_TAG = "ds"
TMP_PREFIX = ".tmp-"
DAMAGED_INFIX = ".damaged-"
UNIVERSAL_FORMAT = "megafire-universal"   # megafire.train.universal's directories (model.pt, meta.json, config.yaml)
_NAME = re.compile(r"^step_(\d+)$")


class CheckpointError(ConfigError, FileNotFoundError):
    """A checkpoint that is missing, incomplete, damaged or does not fit this run: the message names
    the checkpoint and the file (``megafire`` commands print it as one ``error:`` line, exit 2)."""


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
    """The checkpoint ``latest`` names; if that is missing, the newest complete one; else None.

    Only looks for meta.json (the commit marker); readers use :func:`find_checkpoint`."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / "meta.json").is_file():
            return target
    complete = [p for p in list_checkpoints(root) if (p / "meta.json").is_file()]
    return complete[-1] if complete else None


def _check_torch_file(ckpt_dir: Path, path: Path, what: str = "") -> None:
    """Present, non-empty, and a complete torch zip archive (its central directory, at the end of the
    file, is read: a truncated file has none; the data itself is read only by the loader)."""
    import zipfile
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {path} is missing{f' ({what})' if what else ''}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: cannot read {path}: the file is empty")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                zf.infolist()
            return
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: cannot read {path}: {e}") from None
    try:   # not a zip archive: a legacy torch file, or a truncated one
        torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: cannot read {path}: truncated or corrupt (not a "
                              f"complete torch archive: {type(e).__name__})") from None


def _expected_ds_files(ds: Path, meta: dict, optimizer: bool) -> list[tuple[str, str]]:
    """(file name, why) of the DeepSpeed files a checkpoint of ``meta``'s layout must hold (the
    optimizer shards only with ``optimizer``)."""
    tp, pp, dp = int(meta.get("tp", 1)), int(meta.get("pp", 1)), int(meta.get("dp", 1))
    zero = int(meta.get("zero_stage", 0))
    files = []
    if pp > 1:   # per-layer files (a tied layer's second use has none: megafire.train.universal)
        layers = meta.get("pipeline_layers") or []
        for idx, prefix in enumerate(layers):
            if layers.index(prefix) == idx:
                files += [(f"layer_{idx:02d}-model_{t:02d}-model_states.pt", f"layer {idx}, tp rank {t}")
                          for t in range(tp)]
        return files
    for t in range(tp):
        if zero == 3:
            files += [(f"zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt", f"dp rank {d}, tp rank {t}")
                      for d in range(dp)]
        else:
            files.append((f"mp_rank_{t:02d}_model_states.pt", f"model weights, tp rank {t}"))
        if zero >= 1 and optimizer:
            for d in range(dp):
                name = f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt"
                found = sorted(ds.glob(f"*{name}"))   # bf16 optimizers prefix "bf16_"
                files.append((found[0].name if found else name, f"optimizer shard, dp rank {d}, tp rank {t}"))
    return files


def verify_checkpoint(path: str | Path, *, trainer_state: bool = True, optimizer: bool = True) -> dict:
    """Check that checkpoint directory ``path`` is complete and readable; return its meta.json.

    Checks: the directory exists; meta.json parses; config.yaml is present; DeepSpeed's model
    files for every model-parallel (ZeRO-3: and data-parallel) rank, with ``optimizer`` the ZeRO
    optimizer shards, with ``trainer_state`` every rank's trainer-state file, are present,
    non-empty and complete torch archives; so is every other ``.pt`` file present under ``ds/``.
    A reader requires what it reads (resume: everything; export: the model files). Raises
    :class:`CheckpointError` naming the checkpoint and the file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is missing: the directory does not exist")
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no meta.json (the write was interrupted "
                              f"before it was committed)")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: {meta_file} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"checkpoint {path} is damaged: {meta_file} has no 'step'")
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"checkpoint {path} is damaged: {path / 'config.yaml'} is missing")
    if meta.get("format") == UNIVERSAL_FORMAT:
        _check_torch_file(path, path / "model.pt", "the consolidated weights")
        return meta
    ds = path / DS_TAG
    if not ds.is_dir():
        raise CheckpointError(f"checkpoint {path} is damaged: {ds} (DeepSpeed's files) is missing")
    checked = set()
    for name, why in _expected_ds_files(ds, meta, optimizer):
        _check_torch_file(path, ds / name, why)
        checked.add(name)
    for f in sorted(ds.glob("*.pt")):
        if f.name not in checked:
            _check_torch_file(path, f)
    world = int(meta.get("world_size", 1))
    for rank in range(world):
        f = path / rank_state_file(rank)
        if trainer_state or f.exists():
            _check_torch_file(path, f, f"the trainer state of rank {rank} of {world}")
    return meta


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``<name>.damaged-<UTC time>`` (kept for inspection, never pruned)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}{DAMAGED_INFIX}{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}{DAMAGED_INFIX}{stamp}-{n}")
        n += 1
    os.replace(path, target)
    return target


def find_checkpoint(root: str | Path, *, fallback: bool, move_damaged: bool = False,
                    warn: Callable[[str], None] = lambda msg: None, fallback_hint: str = "",
                    **verify) -> Optional[Path]:
    """The checkpoint to read under ``root``: the one ``latest`` names (else the newest), verified.

    When that one is damaged (missing, incomplete, unreadable: :func:`verify_checkpoint`), with
    ``fallback=False`` raise :class:`CheckpointError` naming it, what is wrong and
    ``fallback_hint``; with ``fallback=True`` ``warn`` which checkpoint is skipped and why (and
    with ``move_damaged`` rename it aside: :func:`set_aside`), then try the next older one.
    None when ``root`` holds no checkpoint at all. ``verify``: :func:`verify_checkpoint`'s options.
    """
    root = Path(root)
    candidates = list(reversed(list_checkpoints(root)))
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    damaged: list[str] = []
    for candidate in candidates:
        try:
            verify_checkpoint(candidate, **verify)
        except CheckpointError as e:
            if not fallback:
                older = next((c.name for c in candidates if c != candidate and (c / "meta.json").is_file()), None)
                hint = f"; {fallback_hint}" if fallback_hint else ""
                hint += f" (the next older checkpoint is {older})" if hint and older else ""
                raise CheckpointError(f"{e}{hint}") from None
            moved = ""
            if move_damaged and candidate.exists():
                moved = f"; moved aside to {set_aside(candidate).name}"
            warn(f"skipping damaged checkpoint {candidate.name}: {e}{moved}")
            damaged.append(str(e))
            continue
        return candidate
    if damaged:
        raise CheckpointError(f"no complete checkpoint under {root}: " + "; ".join(damaged))
    return None


def resolve_for_reading(path: str | Path, kinds: str = "a checkpoint") -> Path:
    """A checkpoint directory (verified) or a run directory (its sound checkpoint, falling back
    with a warning past a damaged one: :func:`find_checkpoint`) -> the directory to read the
    model from; the trainer state is not needed. ``kinds`` names what ``path`` may be, for
    the error when it is none of them."""
    path = Path(path)
    if (path / "meta.json").is_file() or (path / DS_TAG).is_dir():
        verify_checkpoint(path, trainer_state=False)   # what we read is present and readable, or an error naming it
        return path
    if not path.exists():
        raise MissingFileError(f"checkpoint {path} does not exist")
    found = find_checkpoint(path / "checkpoints", fallback=True, warn=warn, trainer_state=False)
    if found is None:
        raise MissingFileError(f"{path} is neither {kinds} nor a run directory with a complete checkpoint")
    return found


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
        if final.exists():   # re-saving a step after a resume from an older `latest` (a kill before it moved)
            _discard(final)
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
            _discard(old)


def _discard(path: Path) -> None:
    """Delete checkpoint directory ``path``: renamed to a temporary name first, so that a kill in
    the middle of the deletion leaves a temporary (removed by the next writer), never a
    checkpoint's name on a directory that has lost some of its files."""
    doomed = path.with_name(f"{TMP_PREFIX}deleting-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def load_checkpoint(engine, ckpt_dir: str | Path, *, rank: int, verify: bool = True) -> tuple[dict, dict]:
    """Restore DeepSpeed's state into ``engine``; return (meta, this rank's trainer state).

    ``verify=False`` when the caller has verified the checkpoint already (the trainer: rank 0 does
    it once for the world)."""
    ckpt_dir = Path(ckpt_dir)
    meta = verify_checkpoint(ckpt_dir) if verify else json.loads((ckpt_dir / "meta.json").read_text())
    state_path = ckpt_dir / rank_state_file(rank)
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} has no state for rank {rank}: it was written by "
                              f"{meta.get('world_size')} ranks; resume with the same world size")
    import pickle
    unreadable = (RuntimeError, OSError, EOFError, KeyError, ValueError, AssertionError, pickle.UnpicklingError)
    try:   # verified files that still fail to load (corrupt inside): name the checkpoint, keep DeepSpeed's reason
        load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=True)
    except unreadable as e:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: DeepSpeed cannot load {ckpt_dir / DS_TAG}: "
                              f"{type(e).__name__}: {e}") from e
    if load_path is None:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: DeepSpeed could not load {ckpt_dir / DS_TAG}")
    try:
        return meta, torch.load(state_path, map_location="cpu", weights_only=False)
    except unreadable as e:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: cannot read {state_path}: {type(e).__name__}: "
                              f"{e}") from e


def check_finite(state: dict, where, allow_nonfinite: bool = False) -> None:
    """Refuse weights holding a NaN or inf (a diverged run): :class:`CheckpointError` naming the
    checkpoint and the first such tensor, unless ``allow_nonfinite`` (``--allow-nonfinite``: forensics)."""
    from .faults import first_nonfinite
    found = None if allow_nonfinite else first_nonfinite(state.items())
    if found is not None:
        name, bad, size = found
        raise CheckpointError(f"checkpoint {where} has non-finite weights: {name} ({bad} of {size} values NaN or "
                              f"inf; the run diverged); pass --allow-nonfinite to read it anyway (forensics)")


def warn(msg: str) -> None:
    """A reader's warning (stderr), e.g. that a damaged checkpoint was skipped."""
    import sys
    print(f"[megafire] warning: {msg}", file=sys.stderr, flush=True)
