"""Reading training checkpoints as one consolidated (TP=1, PP=1) state dict.

The single entry point is :func:`consolidated_state_dict`; export, import and
``megafire.load_checkpoint`` read weights only through it, so supporting a new on-disk
layout (tensor/pipeline-parallel shards, ZeRO-3 partitions, a "universal" consolidated
format) means extending this one function.

Layouts understood today (see megafire.train.checkpoint for the writer)::

    RUN_DIR/config.yaml
    RUN_DIR/checkpoints/latest                       -> "step_00000100"
    RUN_DIR/checkpoints/step_00000100/meta.json      written last: its presence marks a complete checkpoint
    RUN_DIR/checkpoints/step_00000100/config.yaml    the resolved config of the run
    RUN_DIR/checkpoints/step_00000100/ds/mp_rank_00_model_states.pt   {"module": {"model.<GPT key>": tensor}}

The weights are returned as DeepSpeed stored them: in the training dtype (bf16 runs hold
bf16 module weights; their fp32 master copy lives in the optimizer shards and is not read).
Keys are the GPT's own (``blocks.0.attn.qkv.weight``): the trainer's ``LanguageModelLoss``
wrapper prefix ``model.`` is removed, and megatron's ``_extra_state`` placeholders (None) are
dropped because they carry no weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megafire.train import checkpoint as _train_ckpt

META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
DS_DIR = "ds"
MODEL_STATES = "mp_rank_00_model_states.pt"
WRAPPER_PREFIX = "model."
EXTRA_STATE_SUFFIX = "._extra_state"


#: a checkpoint that is missing, half-written, damaged or in a layout this reader cannot consolidate
#: (one class for every reader: megafire.train.checkpoint.verify_checkpoint raises it too)
CheckpointError = _train_ckpt.CheckpointError


@dataclass
class CheckpointInfo:
    """Where a resolved checkpoint lives and what its meta.json says."""
    path: Path                  # the step directory
    run_dir: Optional[Path]     # its run directory, when it sits in RUN_DIR/checkpoints/
    meta: dict


#: what export reads of a checkpoint: the model files (sharded layouts: megafire.train.universal checks its own)
_NEEDS = {"trainer_state": False, "optimizer": False}


def _checkpoints_root(path: Path) -> Optional[Path]:
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if (path / "latest").is_file() or any(p.name.startswith("step_") for p in path.iterdir() if p.is_dir()):
        return path
    return None


def _latest_complete(root: Path) -> Path:
    """The checkpoint ``latest`` names if sound, else (with a warning naming the skipped one and
    why) the newest sound one: megafire.train.checkpoint.find_checkpoint; error if none."""
    found = _train_ckpt.find_checkpoint(root, fallback=True, warn=_train_ckpt.warn, **_NEEDS)
    if found is not None:
        return found
    partial = sorted(p.name for p in root.iterdir() if p.is_dir())
    found = f"; found only incomplete entries: {', '.join(partial)}" if partial else ""
    raise CheckpointError(f"no complete checkpoint under {root} (a checkpoint is complete once its "
                          f"{META_FILE} is written and its directory renamed from .tmp-*){found}")


def resolve_checkpoint(path: str | Path) -> CheckpointInfo:
    """A run directory, its ``checkpoints/`` directory or one ``step_*`` directory -> the checkpoint.

    Raises :class:`CheckpointError` naming the path when it does not exist, holds no complete
    checkpoint, or is a checkpoint that was never committed (no meta.json, ``.tmp-`` name).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is not a directory (pass a run directory or a "
                              f"checkpoints/step_* directory)")
    if path.name == DS_DIR and (path.parent / META_FILE).exists():
        path = path.parent
    if not (path / META_FILE).is_file():
        if path.name.startswith(".tmp-") or (path / DS_DIR).is_dir():
            raise CheckpointError(f"checkpoint {path} is incomplete: it has no {META_FILE} (the write was "
                                  f"interrupted before it was committed); use the checkpoint 'latest' names")
        root = _checkpoints_root(path)
        if root is None:
            raise CheckpointError(f"{path} is neither a megafire run directory (no checkpoints/) nor a "
                                  f"checkpoint (no {META_FILE})")
        path = _latest_complete(root)
    meta = _train_ckpt.verify_checkpoint(path, **_NEEDS)   # what we read is present and readable, or an error naming it
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    return CheckpointInfo(path=path, run_dir=run_dir, meta=meta)


def _is_sharded(info: CheckpointInfo) -> bool:
    """Tensor/pipeline shards or ZeRO-3 partitions: the weights live in several files."""
    meta, path = info.meta, info.path
    return (int(meta.get("tp", 1)) > 1 or int(meta.get("pp", 1)) > 1 or int(meta.get("zero_stage", 0)) == 3
            or (path / DS_DIR / "mp_rank_01_model_states.pt").exists())


def _from_universal(info: CheckpointInfo):
    """Sharded layouts go through the universal format (megafire.train.universal), which merges
    TP shards, pipeline layer files and ZeRO-3 partitions into fp32 TP=1 weights; they are cast
    back to the training precision so that a bf16 run exports bf16 whatever its layout."""
    from megafire.train.universal import consolidated_state_dict as merge
    try:
        cfg, state = merge(info.path)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {info.path}: cannot merge its shards: {type(e).__name__}: {e}") from None
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    return cfg, {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in state.items()}


def _model_states_file(info: CheckpointInfo) -> Path:
    """The single model-states file of an unsharded checkpoint (sharded ones go through
    :func:`_from_universal` before this is reached)."""
    states = info.path / DS_DIR / MODEL_STATES
    if not states.is_file():
        raise CheckpointError(f"checkpoint {info.path} has no model weights: {states} is missing")
    return states


def load_config_of(info: CheckpointInfo):
    """The resolved Config saved with the checkpoint (or, failing that, with its run)."""
    from megafire.config import load_config
    for candidate in (info.path / CONFIG_FILE, info.run_dir / CONFIG_FILE if info.run_dir else None):
        if candidate is not None and candidate.is_file():
            return load_config(candidate)
    raise CheckpointError(f"checkpoint {info.path} has no {CONFIG_FILE} (nor does its run directory)")


def consolidated_state_dict(checkpoint_dir: str | Path):
    """``checkpoint_dir`` (run dir, checkpoints/ or step dir) -> ``(Config, {GPT key: tensor})``.

    The state dict is the full (unsharded) GPT state dict on CPU, in the stored dtype; the
    Config is the run's resolved config. This is the one function to extend for sharded
    layouts (see the module docstring).
    """
    info = resolve_checkpoint(checkpoint_dir)
    if _is_sharded(info):
        return _from_universal(info)
    states = _model_states_file(info)
    cfg = load_config_of(info)
    try:
        blob = torch.load(states, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or corrupt file: name it rather than show pickle internals
        raise CheckpointError(f"checkpoint {info.path}: cannot read {states}: {type(e).__name__}: {e}") from None
    module = blob.get("module") if isinstance(blob, dict) else None
    if not isinstance(module, dict):
        raise CheckpointError(f"checkpoint {info.path}: {states} holds no 'module' state dict")
    state = {}
    for key, value in module.items():
        if key.endswith(EXTRA_STATE_SUFFIX) or key == "_extra_state":
            continue
        state[key.removeprefix(WRAPPER_PREFIX)] = value
    return cfg, state


def checkpoint_dtype(state: dict) -> torch.dtype:
    """The floating dtype holding most of the weights (the training precision: bf16 or fp32)."""
    count: dict[torch.dtype, int] = {}
    for v in state.values():
        if torch.is_floating_point(v):
            count[v.dtype] = count.get(v.dtype, 0) + v.numel()
    return max(count, key=count.get) if count else torch.float32
