"""What a megafire model becomes in Hugging Face terms: the architecture and its config.json.

Two targets:

* ``LlamaForCausalLM`` (no remote code): RoPE with scaling none / linear / dynamic / yarn
  over the whole head (``partial_rotary_factor == 1``). Our block is Llama's block (pre-norm
  RMSNorm, GQA, SwiGLU, rotate-half RoPE, optional tied embeddings), so the weights map 1:1.
  Scalings map to ``rope_parameters`` (transformers 5) and ``rope_scaling`` (4.x readers);
  transformers' "dynamic" takes the original length from ``max_position_embeddings``, so
  there it is the training length, while yarn gets ``factor * original``.
* ``MegafireForCausalLM`` (remote code, megafire/export/hf_modeling/): every other encoding,
  and RoPE variants Llama lacks (static NTK, partial rotary). Its config carries the
  encoding's name and *every* option resolved to an explicit value, so the exported model
  does not depend on megafire's defaults at the time it is read.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from megafire.config import Config, ModelConfig

LLAMA_ROPE_TYPES = {"none": "default", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn"}
REMOTE_MODEL_TYPE = "megafire"
REMOTE_FILES = ("configuration_megafire.py", "modeling_megafire.py")
AUTO_MAP = {"AutoConfig": "configuration_megafire.MegafireConfig",
            "AutoModel": "modeling_megafire.MegafireModel",
            "AutoModelForCausalLM": "modeling_megafire.MegafireForCausalLM"}
# Options the constructor takes that are placement, not maths.
_NOT_OPTIONS = ("self", "num_heads", "head_dim", "tp_rank", "tp_size")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def resolved_position_options(model: ModelConfig) -> dict[str, Any]:
    """The encoding's options with every default made explicit (what the model was built with)."""
    from megafire.positional import encoding_class
    params = inspect.signature(encoding_class(model.position.name).__init__).parameters
    options = {name: p.default for name, p in params.items()
               if name not in _NOT_OPTIONS and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    if "max_positions" in options:        # megafire.model.layers.build_encodings supplies this one
        options["max_positions"] = model.max_positions
    options.update(model.position.options)
    if options.get("hidden_size", 0) is None:
        options["hidden_size"] = model.hidden_size
    return options


def is_shared_across_layers(model: ModelConfig) -> bool:
    """True when one encoding instance serves every layer (T5 by default, FIRE-S)."""
    return bool(resolved_position_options(model).get("shared", False))


def llama_compatible(model: ModelConfig) -> bool:
    if model.position.name != "rope":
        return False
    options = resolved_position_options(model)
    return options["scaling"] in LLAMA_ROPE_TYPES and float(options["partial_rotary_factor"]) == 1.0


def architecture(model: ModelConfig) -> str:
    return "LlamaForCausalLM" if llama_compatible(model) else "MegafireForCausalLM"


def _common(cfg: Config, dtype: torch.dtype, special_ids: dict[str, int]) -> dict[str, Any]:
    m = cfg.model
    import transformers
    return {
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.resolved_ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads or m.num_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": m.norm_eps,
        "initializer_range": m.init_std,
        "tie_word_embeddings": m.tie_embeddings,
        "use_cache": True,
        "bos_token_id": special_ids["bos"],
        "eos_token_id": special_ids["eos"],
        "pad_token_id": special_ids["pad"],
        "dtype": DTYPE_NAMES[dtype],          # transformers 5
        "torch_dtype": DTYPE_NAMES[dtype],    # transformers 4.x
        "transformers_version": transformers.__version__,
    }


def _llama_rope(options: dict, train_length: int) -> tuple[dict, dict | None, int]:
    """(rope_parameters, rope_scaling, max_position_embeddings) for a Llama export."""
    scaling, base, factor = options["scaling"], float(options["base"]), float(options["factor"])
    rope_type = LLAMA_ROPE_TYPES[scaling]
    params: dict[str, Any] = {"rope_type": rope_type, "rope_theta": base}
    max_positions = train_length
    if scaling != "none":
        params["factor"] = factor
    if scaling == "dynamic":                   # transformers' original length is max_position_embeddings
        max_positions = int(options["original_max_positions"])
    if scaling == "yarn":
        original = int(options["original_max_positions"])
        params.update(original_max_position_embeddings=original, beta_fast=32.0, beta_slow=1.0, truncate=True)
        max_positions = int(round(factor * original))
    # 4.x readers: "type" (<= 4.44) and "rope_type"; rope_theta stays at the top level there.
    legacy = None if scaling == "none" else {"type": rope_type,
                                             **{k: v for k, v in params.items() if k != "rope_theta"}}
    return params, legacy, max_positions


def llama_config(cfg: Config, dtype: torch.dtype, special_ids: dict[str, int]) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM export."""
    m = cfg.model
    rope_parameters, rope_scaling, max_positions = _llama_rope(resolved_position_options(m), cfg.train_length)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_common(cfg, dtype, special_ids),
        "max_position_embeddings": max_positions,
        "rope_theta": rope_parameters["rope_theta"],
        "rope_parameters": rope_parameters,
        "rope_scaling": rope_scaling,
        "attention_bias": m.linear_bias,
        "mlp_bias": m.linear_bias,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
    }


def remote_config(cfg: Config, dtype: torch.dtype, special_ids: dict[str, int]) -> dict[str, Any]:
    """config.json of a MegafireForCausalLM (remote code) export."""
    m = cfg.model
    options = resolved_position_options(m)
    max_positions = int(options["max_positions"]) if m.position.name == "learned" else cfg.train_length
    return {
        "architectures": ["MegafireForCausalLM"],
        "model_type": REMOTE_MODEL_TYPE,
        "auto_map": dict(AUTO_MAP),
        **_common(cfg, dtype, special_ids),
        "max_position_embeddings": max_positions,
        "train_length": cfg.train_length,
        "linear_bias": m.linear_bias,
        "position_encoding": m.position.name,
        "position_options": options,
    }


def hf_config(cfg: Config, dtype: torch.dtype, special_ids: dict[str, int]) -> dict[str, Any]:
    build = llama_config if llama_compatible(cfg.model) else remote_config
    return build(cfg, dtype, special_ids)
