"""The universal checkpoint format: one fp32 state dict of the TP=1, PP=1 GPT, any layout in or out.

Reading (``consolidated_state_dict``) accepts a run directory (its ``checkpoints/latest``),
one ``step_XXXXXXXX`` checkpoint directory, or a universal directory written by
:func:`save_universal`, from any training layout:

* ``tp`` shards (per model-parallel rank ``mp_rank_XX``) are merged by the layer layouts of
  megafire.model: column-parallel weights (fused QKV per key/value group, the vocabulary of
  the embedding and output) concatenate along dim 0, the SwiGLU ``gate_up`` weight with
  stride 2 (each rank holds ``[gate_r; up_r]``), row-parallel weights (attention ``out``, MLP
  ``down``) along dim 1; encoding tensors that are per head concatenate along the head
  dimension (found by building the encoding at tp=1 and at tp); everything else is
  replicated and taken from rank 0.
* ``pp`` stages are DeepSpeed per-layer files, mapped back to GPT names through the
  ``pipeline_layers`` list in meta.json (megafire.parallel.pipeline.layer_prefixes).
* ZeRO 1-3: the fp32 master weights are read from the optimizer partitions (DeepSpeed's
  ``zero_to_fp32``, per model-parallel rank); ZeRO-0 and pipelines: the module weights.

Writing (``save_universal``) stores that dict with the config and step::

    OUT/model.pt       {"<GPT key>": fp32 tensor}, keys as GPT(TP=1).state_dict() minus _extra_state
    OUT/config.yaml    the run's resolved config
    OUT/meta.json      {"format": "megafire-universal", "version": 1, "step", "tokens", "source", ...}

and ``shard_state_dict`` cuts it for a model of another layout (``megafire train --init-from``
trains a new layout from it; the optimizer state starts fresh).

Command line::

    python -m megafire.train.universal RUN_OR_CHECKPOINT_DIR OUT_DIR
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from megafire.config import Config, load_config

from . import checkpoint as ckpt

FORMAT = "megafire-universal"
VERSION = 1
MODEL_FILE = "model.pt"
MODULE_PREFIX = "model."   # LanguageModelLoss wraps the GPT as `.model`

#: (name suffix, concat dim, stride) for the megatron tensor-parallel layers of megafire.model
_SHARDED = (
    (".qkv.weight", 0, 1), (".qkv.bias", 0, 1), (".q.weight", 0, 1), (".q.bias", 0, 1),
    (".kv.weight", 0, 1), (".kv.bias", 0, 1),
    (".gate_up.weight", 0, 2), (".gate_up.bias", 0, 2),
    ("embedding.word.weight", 0, 1), ("head.output.weight", 0, 1),
    (".out.weight", 1, 1), (".down.weight", 1, 1),
)


def is_universal(path: str | Path) -> bool:
    path = Path(path)
    return (path / MODEL_FILE).is_file() and (path / "meta.json").is_file() and \
        json.loads((path / "meta.json").read_text()).get("format") == FORMAT


def resolve(path: str | Path) -> Path:
    """A universal directory, a checkpoint directory, or a run directory -> that directory /
    its newest complete checkpoint."""
    return ckpt.resolve_for_reading(path, "a universal checkpoint, a checkpoint")


def _config(ckpt_dir: Path) -> Config:
    cfg = load_config(ckpt_dir / "config.yaml")
    if not is_universal(ckpt_dir):
        cfg.run.dir = str(ckpt_dir.parent.parent)
    return cfg


def consolidated_state_dict(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """(config, fp32 state dict of the TP=1 single-process GPT) from any checkpoint layout.

    Keys are those of ``GPT.state_dict()`` built at tp=1 without megatron's ``_extra_state``
    entries (load with ``strict=False`` and check that nothing but ``_extra_state`` is missing,
    or use :func:`load_into`). Values are fp32 CPU tensors. ``run.dir`` of the config points at
    the run directory the checkpoint lies in now.
    """
    src = resolve(path)
    cfg = _config(src)
    if is_universal(src):
        return cfg, torch.load(src / MODEL_FILE, map_location="cpu", weights_only=True)
    meta = json.loads((src / "meta.json").read_text())
    tp, pp = int(meta.get("tp", 1)), int(meta.get("pp", 1))
    shards = [_rank_state(src, meta, tp_rank, tp, pp) for tp_rank in range(tp)]
    return cfg, merge_tp_shards(shards, cfg)


def _clean(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v.detach().float().cpu() for k, v in state.items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}


def _rank_state(src: Path, meta: dict, tp_rank: int, tp: int, pp: int) -> dict[str, torch.Tensor]:
    """The GPT-named state of one tensor-parallel rank (all pipeline stages joined)."""
    ds = src / ckpt.DS_TAG
    if pp > 1:
        layers = meta.get("pipeline_layers")
        if not layers:
            raise RuntimeError(f"{src}: pipeline checkpoint without meta.json 'pipeline_layers'")
        out: dict[str, torch.Tensor] = {}
        for idx, prefix in enumerate(layers):
            f = ds / f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt"
            if not f.is_file() and layers.index(prefix) < idx:
                continue   # a tied layer's second use (the logits) has no file of its own
            state = torch.load(f, map_location="cpu", weights_only=False)
            for k, v in _clean(state).items():
                out.setdefault(f"{prefix}.{k.removeprefix('inner.')}", v)   # tied layers: first copy
        return out
    if int(meta.get("zero_stage", 0)) == 0:
        states = torch.load(ds / f"mp_rank_{tp_rank:02d}_model_states.pt", map_location="cpu", weights_only=False)
        return _clean(states["module"], MODULE_PREFIX)
    return _clean(_zero_fp32(ds, tp_rank), MODULE_PREFIX)


def _zero_fp32(ds: Path, tp_rank: int) -> dict:
    """DeepSpeed's zero_to_fp32 over the files of one model-parallel rank (it globs every rank's)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    tag = f"mp_rank_{tp_rank:02d}"
    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / ckpt.DS_TAG
        view.mkdir()
        for f in ds.iterdir():
            if tag in f.name:
                os.symlink(f.resolve(), view / f.name)
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):   # progress bars
            return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=ckpt.DS_TAG)


def _encoding_layout(cfg: Config, tp: int) -> dict[str, tuple[int, int]]:
    """Encoding tensor name (relative to the encoding) -> (concat dim, tp) for per-head tensors."""
    if tp == 1:
        return {}
    from megafire.model.layers import build_encodings
    from megafire.parallel.context import ParallelContext
    with torch.random.fork_rng(devices=[]):
        full = _first_encoding(build_encodings(cfg.model, ParallelContext()))
        local = _first_encoding(build_encodings(cfg.model, ParallelContext(tp_rank=0, tp_size=tp)))
    if full is None:
        return {}
    out = {}
    full_state, local_state = full.state_dict(), local.state_dict()
    for name, t in full_state.items():
        lt = local_state[name]
        if t.shape != lt.shape:
            dims = [d for d, (a, b) in enumerate(zip(t.shape, lt.shape)) if a != b]
            if len(dims) != 1 or lt.shape[dims[0]] * tp != t.shape[dims[0]]:
                raise RuntimeError(f"encoding tensor {name}: cannot tell how shape {tuple(lt.shape)} at tp={tp} "
                                   f"shards {tuple(t.shape)}")
            out[name] = (dims[0], 1)
    return out


def _first_encoding(built):
    embed, per_layer = built
    return embed if embed is not None else next((e for e in per_layer if e is not None), None)


def _layout_of(key: str, encoding_layout: dict) -> Optional[tuple[int, int]]:
    """(concat dim, stride) of a sharded tensor, None for a replicated one."""
    for suffix, dim, stride in _SHARDED:
        if key.endswith(suffix):
            return dim, stride
    if ".encoding." in key or key.startswith("embedding.encoding."):
        return encoding_layout.get(key.rsplit("encoding.", 1)[1])
    return None


def merge_tp_shards(shards: list[dict[str, torch.Tensor]], cfg: Config) -> dict[str, torch.Tensor]:
    """Per-TP-rank GPT state dicts -> the TP=1 state dict (layouts: module docstring)."""
    tp = len(shards)
    if tp == 1:
        return dict(shards[0])
    enc = _encoding_layout(cfg, tp)
    out = {}
    for key, first in shards[0].items():
        layout = _layout_of(key, enc)
        if layout is None:
            out[key] = first
            continue
        dim, stride = layout
        parts = [s[key] for s in shards]
        if stride == 1:
            out[key] = torch.cat(parts, dim=dim)
        else:   # each rank: [chunk_0 of rank r; ...; chunk_{stride-1} of rank r]
            chunks = [p.chunk(stride, dim=dim) for p in parts]
            out[key] = torch.cat([c[i] for i in range(stride) for c in chunks], dim=dim)
    return out


def shard_state_dict(state: dict[str, torch.Tensor], cfg: Config, tp_rank: int, tp: int) -> dict[str, torch.Tensor]:
    """The TP=1 state dict -> what TP rank ``tp_rank`` of ``tp`` holds (inverse of :func:`merge_tp_shards`)."""
    if tp == 1:
        return dict(state)
    enc = _encoding_layout(cfg, tp)
    out = {}
    for key, full in state.items():
        layout = _layout_of(key, enc)
        if layout is None:
            out[key] = full
            continue
        dim, stride = layout
        if stride == 1:
            out[key] = full.chunk(tp, dim=dim)[tp_rank].clone()
        else:
            out[key] = torch.cat([c.chunk(tp, dim=dim)[tp_rank] for c in full.chunk(stride, dim=dim)], dim=dim)
    return out


def load_into(model, state: dict[str, torch.Tensor], cfg: Config) -> None:
    """Copy a TP=1 state dict into a GPT of any TP size (its ``parallel`` context says which shard)."""
    local = shard_state_dict(state, cfg, model.parallel.tp_rank, model.parallel.tp_size)
    own = model.state_dict()
    local = {k: v.to(own[k].dtype) for k, v in local.items() if k in own}
    missing, unexpected = model.load_state_dict(local, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"state dict does not match the model: missing {missing}, unexpected {unexpected}")


def init_from_factory(path: str | Path):
    """A trainer ``model_factory`` that builds the GPT of the run's config and loads the weights
    of ``path`` (any layout) into it: training continues in a new layout from those weights
    (never from non-finite ones: CheckpointError)."""
    _, state = consolidated_state_dict(path)
    ckpt.check_finite(state, path)

    def factory(cfg: Config, ctx):
        from megafire.model import GPT
        model = GPT.from_config(cfg, ctx)
        load_into(model, state, cfg)
        return model
    return factory


def save_universal(path: str | Path, out_dir: str | Path, *, allow_nonfinite: bool = False) -> Path:
    """Write the universal form of a checkpoint (see the module docstring); returns ``out_dir``.
    Weights holding a NaN or inf are refused unless ``allow_nonfinite``."""
    src = resolve(path)
    cfg, state = consolidated_state_dict(src)
    ckpt.check_finite(state, src, allow_nonfinite)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_src = json.loads((src / "meta.json").read_text())
    torch.save(state, out / MODEL_FILE)
    (out / "config.yaml").write_text((src / "config.yaml").read_text())
    keep = {k: meta_src.get(k) for k in ("step", "tokens", "stage", "seq_len", "tokenizer_sha256")}
    source = {k: meta_src.get(k) for k in ("tp", "pp", "dp", "zero_stage", "precision")}
    (out / "meta.json").write_text(json.dumps({"format": FORMAT, "version": VERSION, **keep,
                                               "source": str(src), "source_layout": source}, indent=1))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    allow_nonfinite = "--allow-nonfinite" in argv
    argv = [a for a in argv if a != "--allow-nonfinite"]
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print("usage: python -m megafire.train.universal RUN_OR_CHECKPOINT_DIR OUT_DIR [--allow-nonfinite]",
              file=sys.stderr)
        return 2
    from megafire.config import ConfigError
    try:
        out = save_universal(argv[0], argv[1], allow_nonfinite=allow_nonfinite)
    except ConfigError as e:   # a damaged checkpoint, non-finite weights: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = len(torch.load(out / MODEL_FILE, map_location="cpu", weights_only=True))
    print(f"wrote {out} ({n} tensors, TP=1 fp32)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
