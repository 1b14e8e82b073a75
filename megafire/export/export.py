"""``export_checkpoint``: a megafire checkpoint -> a Hugging Face model directory.

Written files::

    config.json                 LlamaForCausalLM or MegafireForCausalLM (+ auto_map), see spec.py
    model.safetensors           weights in the checkpoint's dtype (bf16 runs -> bf16), see convert.py
    generation_config.json      bos / eos / pad ids
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model   (tokenizer.py)
    configuration_megafire.py, modeling_megafire.py    remote code (non-Llama exports only)
    megafire_config.yaml        the run's resolved config: `megafire import` rebuilds the exact model
    megafire_export.json        provenance: source checkpoint, step, tokens, layout, versions

The directory is assembled under a temporary name and renamed into place, so a reader
never sees a half-written export.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from megafire.config import ConfigError

from .checkpoint import CheckpointInfo, consolidated_state_dict, checkpoint_dtype, resolve_checkpoint
from .convert import to_hf
from .spec import REMOTE_FILES, hf_config, llama_compatible

DEFAULT_SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}   # megafire.data.tokenizer's fixed ids
HF_MODELING_DIR = Path(__file__).parent / "hf_modeling"
EXPORT_INFO = "megafire_export.json"
EXPORT_CONFIG = "megafire_config.yaml"


def log(msg: str) -> None:
    print(f"[megafire.export] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_tokenizer(info: CheckpointInfo, cfg) -> Optional[Path]:
    """The run's tokenizer.model: next to the checkpoint (imports), in the run directory, or
    where the data config points (data.tokenizer_dir, else ``{run.dir}/../data/tokenizer``,
    tried both as recorded and relative to where the run directory is now)."""
    candidates = [info.path / "tokenizer.model"]
    if info.run_dir is not None:
        candidates += [info.run_dir / "tokenizer.model", info.run_dir / "tokenizer" / "tokenizer.model",
                       info.run_dir.parent / "data" / "tokenizer" / "tokenizer.model"]
    if cfg.data.tokenizer_dir:
        candidates.append(Path(cfg.data.tokenizer_dir) / "tokenizer.model")
    candidates.append(Path(cfg.run.dir).parent / "data" / "tokenizer" / "tokenizer.model")
    return next((c for c in candidates if c.is_file()), None)


def _check_tokenizer(tokenizer: Path, info: CheckpointInfo, cfg) -> None:
    expected = info.meta.get("tokenizer_sha256")
    if expected and _sha256(tokenizer) != expected:
        raise ConfigError(f"tokenizer {tokenizer} (sha256 {_sha256(tokenizer)[:12]}) is not the one checkpoint "
                         f"{info.path} was trained with (sha256 {expected[:12]}); pass --tokenizer")
    import sentencepiece as spm
    n = spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
    if n != cfg.model.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer} has {n} pieces but the model's vocab_size is "
                         f"{cfg.model.vocab_size}")


def _write_weights(hf_state: dict, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().cpu().contiguous() for k, v in hf_state.items()}, str(path),
              metadata={"format": "pt", **{k: str(v) for k, v in metadata.items()}})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)       # safetensors creates 0600; exports are meant to be shared


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _provenance(info: CheckpointInfo, state: dict, tokenizer: Optional[Path], fused_qkv: bool) -> dict:
    import megafire
    return {"format": 1, "megafire_version": megafire.__version__, "source_checkpoint": str(info.path.resolve()),
            "step": info.meta.get("step"), "tokens": info.meta.get("tokens"),
            "precision": info.meta.get("precision"), "dtype": str(checkpoint_dtype(state)).removeprefix("torch."),
            "qkv_layout": "fused" if fused_qkv else "split", "tokenizer": str(tokenizer) if tokenizer else None,
            "tokenizer_sha256": _sha256(tokenizer) if tokenizer else None}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, tokenizer: str | Path | None = None,
                      overwrite: bool = False, allow_nonfinite: bool = False) -> Path:
    """Export ``checkpoint`` (run dir or step dir) to ``out_dir``; returns ``out_dir``.

    ``tokenizer``: a tokenizer.model (or its directory) to use instead of the run's own; without
    one found, the export has no tokenizer files (a warning says so). Weights holding a NaN or
    inf (a diverged run) are refused unless ``allow_nonfinite``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"export directory {out_dir} exists and is not empty (use --overwrite)")
    info = resolve_checkpoint(checkpoint)
    cfg, state = consolidated_state_dict(info.path)
    from megafire.train.checkpoint import check_finite
    check_finite(state, info.path, allow_nonfinite)
    tok = Path(tokenizer) if tokenizer else find_tokenizer(info, cfg)
    if tok is not None and tok.is_dir():
        tok = tok / "tokenizer.model"
    if tokenizer and not tok.is_file():
        raise FileNotFoundError(f"tokenizer {tok} does not exist")
    fused_qkv = any(".attn.qkv." in k for k in state)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        special = dict(DEFAULT_SPECIAL_IDS)
        if tok is not None:
            _check_tokenizer(tok, info, cfg)
            from .tokenizer import write_hf_tokenizer
            special.update(write_hf_tokenizer(tok, tmp))
        else:
            log(f"no tokenizer found for {info.path} (data.corpus={cfg.data.corpus!r}); exporting weights only")
        dtype = checkpoint_dtype(state)
        _write_json(tmp / "config.json", hf_config(cfg, dtype, special))
        _write_json(tmp / "generation_config.json", {"bos_token_id": special["bos"], "eos_token_id": special["eos"],
                                                      "pad_token_id": special["pad"], "do_sample": False})
        provenance = _provenance(info, state, tok, fused_qkv)
        _write_weights(to_hf(state, cfg.model), tmp / "model.safetensors", {"megafire_step": provenance["step"]})
        if not llama_compatible(cfg.model):
            for name in REMOTE_FILES:
                shutil.copyfile(HF_MODELING_DIR / name, tmp / name)
        cfg.save(tmp / EXPORT_CONFIG)
        _write_json(tmp / EXPORT_INFO, provenance)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    arch = "LlamaForCausalLM" if llama_compatible(cfg.model) else "MegafireForCausalLM (trust_remote_code=True)"
    log(f"exported {info.path} ({cfg.model.position.name}, {str(dtype).removeprefix('torch.')}) as {arch} "
        f"to {out_dir}")
    return out_dir

