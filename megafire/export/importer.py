"""``import_export``: a Hugging Face directory written by ``megafire export`` -> a megafire run.

The result is a run directory in the trainer's checkpoint layout (megafire.train.checkpoint),
readable by :func:`megafire.export.consolidated_state_dict`, ``megafire.load_checkpoint``,
evaluation and a new export::

    RUN_DIR/config.yaml
    RUN_DIR/checkpoints/latest
    RUN_DIR/checkpoints/step_<step>/{ds/mp_rank_00_model_states.pt, meta.json, config.yaml, tokenizer.model}

Weights are copied tensor for tensor (no dtype change), so export -> import reproduces the
original state dict bit for bit. There is no optimizer state: the checkpoint initializes
evaluation or a new training run, it does not resume the old one.

The exact model comes from ``megafire_config.yaml``; a directory without it (a Llama or
megafire config.json written by another tool) is read from config.json alone.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from megafire.config import ConfigError

from .checkpoint import CONFIG_FILE, DS_DIR, META_FILE, MODEL_STATES, WRAPPER_PREFIX, checkpoint_dtype
from .convert import from_hf
from .export import EXPORT_CONFIG, EXPORT_INFO

PRECISION_OF = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = hf_dir / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{hf_dir} holds no model.safetensors (nor model.safetensors.index.json)")
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(hf_dir / name)))
    return state


def config_from_hf(hf: dict):
    """A megafire Config from a Llama or megafire config.json (when megafire_config.yaml is absent)."""
    from megafire.config import load_config
    model = {"vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"],
             "num_layers": hf["num_hidden_layers"], "num_heads": hf["num_attention_heads"],
             "num_kv_heads": hf.get("num_key_value_heads"), "ffn_hidden_size": hf["intermediate_size"],
             "norm_eps": hf["rms_norm_eps"], "tie_embeddings": hf.get("tie_word_embeddings", False),
             "init_std": hf.get("initializer_range", 0.02)}
    if hf.get("model_type") == "megafire":
        model["linear_bias"] = hf.get("linear_bias", False)
        model["position"] = {"name": hf["position_encoding"], "options": dict(hf.get("position_options", {}))}
        train_length = hf.get("train_length", hf.get("max_position_embeddings", 2048))
    elif hf.get("model_type") == "llama":
        model["linear_bias"] = bool(hf.get("attention_bias", False))
        model["position"] = {"name": "rope", "options": _rope_options(hf)}
        train_length = hf.get("max_position_embeddings", 2048)
    else:
        raise ConfigError(f"cannot import model_type {hf.get('model_type')!r}: only llama and megafire")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        raise ConfigError(f"head_dim={head_dim} x heads != hidden_size: megafire needs hidden = heads x head_dim")
    return load_config(None, {"model": model, "data": {"seq_len": train_length},
                              "train": {"tokens_per_step": train_length}})


def _rope_options(hf: dict) -> dict:
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    base = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    names = {"default": "none", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn"}
    if rope_type not in names:
        raise ConfigError(f"rope type {rope_type!r} has no megafire equivalent (allowed: {', '.join(names)})")
    options = {"base": float(base), "scaling": names[rope_type]}
    if rope_type != "default":
        options["factor"] = float(params["factor"])
    if rope_type == "dynamic":
        options["original_max_positions"] = int(hf["max_position_embeddings"])
    if rope_type == "yarn":
        options["original_max_positions"] = int(params["original_max_position_embeddings"])
    return options


def _check_consistent(cfg, hf: dict, hf_dir: Path) -> None:
    m = cfg.model
    pairs = {"vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers,
             "num_attention_heads": m.num_heads, "intermediate_size": m.resolved_ffn_hidden_size}
    for key, ours in pairs.items():
        if key in hf and hf[key] != ours:
            raise ConfigError(f"{hf_dir}: config.json {key}={hf[key]} disagrees with {EXPORT_CONFIG} ({ours})")


def read_export(hf_dir: str | Path):
    """(Config, megafire GPT state dict, provenance dict) of an export directory."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model directory: config.json is missing")
    hf = json.loads((hf_dir / "config.json").read_text())
    info = json.loads((hf_dir / EXPORT_INFO).read_text()) if (hf_dir / EXPORT_INFO).is_file() else {}
    if (hf_dir / EXPORT_CONFIG).is_file():
        from megafire.config import load_config
        cfg = load_config(hf_dir / EXPORT_CONFIG)
        _check_consistent(cfg, hf, hf_dir)
    else:
        cfg = config_from_hf(hf)
    state = from_hf(_read_weights(hf_dir), cfg.model, fused_qkv=info.get("qkv_layout", "fused") == "fused")
    return cfg, state, info


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def import_export(hf_dir: str | Path, run_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``hf_dir`` as a megafire run at ``run_dir``; returns the checkpoint directory."""
    from megafire.train.checkpoint import checkpoint_name
    from .load import build_gpt
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    root = run_dir / "checkpoints"
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"{root} already holds checkpoints (use --overwrite)")
    cfg, state, info = read_export(hf_dir)
    cfg.run.dir = str(run_dir)
    gpt = build_gpt(cfg, state)               # proves the weights fit the config before anything is written
    module = {WRAPPER_PREFIX + k: (state[k] if k in state else None) for k in gpt.state_dict()}
    dtype = checkpoint_dtype(state)
    step = int(info.get("step") or 0)
    name = checkpoint_name(step)
    tmp, final = root / f".tmp-{name}", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / DS_DIR).mkdir(parents=True)
    torch.save({"module": module, "dp_world_size": 1, "mp_world_size": 1, "ds_version": None,
                "megafire_imported_from": str(hf_dir.resolve())}, tmp / DS_DIR / MODEL_STATES)
    tokenizer_sha = None
    if (hf_dir / "tokenizer.model").is_file():
        shutil.copyfile(hf_dir / "tokenizer.model", tmp / "tokenizer.model")
        from .export import _sha256
        tokenizer_sha = _sha256(tmp / "tokenizer.model")
    cfg.save(tmp / CONFIG_FILE)
    meta = {"step": step, "tokens": info.get("tokens") or 0, "world_size": 1, "tp": 1, "pp": 1, "dp": 1,
            "zero_stage": 0, "precision": PRECISION_OF.get(dtype, str(dtype)), "tokenizer_sha256": tokenizer_sha,
            "imported_from": str(hf_dir.resolve()), "saved_at": time.time()}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_text(root / "latest", name + "\n")
    cfg.save(run_dir / CONFIG_FILE)
    print(f"[megafire.import] {hf_dir} -> {final}", file=sys.stderr)
    return final
