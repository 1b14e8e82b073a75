"""Weight mapping between megafire's GPT state dict (TP=1) and the Hugging Face layouts.

Every operation is a slice or a concatenation along the output dimension, so the mapping
is exact both ways (bit-identical round trip; dtypes are kept as stored).

* Fused QKV (megafire.model.attention): rows grouped per key/value head ``g``,
  ``[q_g0 .. q_g(R-1), k_g, v_g]`` with ``R = Hq / Hkv`` query heads of ``D`` rows each.
  Viewed as ``[Hkv, R + 2, D, hidden]``: ``q = w[:, :R]`` (query head ``g * R + r``, the
  order the model reshapes to), ``k = w[:, R]``, ``v = w[:, R + 1]``. The unfused layout
  (``attn.q`` + ``attn.kv`` with ``[Hkv, 2, D]``) is handled too.
* SwiGLU: ``gate_up = [W_gate; W_up]`` (2F x hidden) -> ``gate_proj = w[:F]``, ``up_proj = w[F:]``.
* Norms, embeddings and the untied output layer are renamed only.
* Position-encoding parameters keep their megafire names under ``model.layers.{i}.self_attn.position.``
  (per layer) or ``model.position.`` (one instance shared by all layers, e.g. T5, FIRE-S);
  learned absolute embeddings go to ``model.embed_positions.``.
"""
from __future__ import annotations

import re

import torch

from megafire.config import ModelConfig

from .spec import is_shared_across_layers

_LAYER = re.compile(r"^blocks\.(\d+)\.(.+)$")
_RENAMES = {  # megafire (inside a block) -> HF (inside model.layers.{i})
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.out.weight": "self_attn.o_proj.weight",
    "attn.out.bias": "self_attn.o_proj.bias",
    "mlp.down.weight": "mlp.down_proj.weight",
    "mlp.down.bias": "mlp.down_proj.bias",
}
_TOP = {  # megafire -> HF, outside the blocks
    "embedding.word.weight": "model.embed_tokens.weight",
    "head.norm.weight": "model.norm.weight",
    "head.output.weight": "lm_head.weight",
}
SHARED_PREFIX = "model.position."
EMBED_POSITIONS_PREFIX = "model.embed_positions."


def _heads(model: ModelConfig) -> tuple[int, int, int]:
    hkv = model.num_kv_heads or model.num_heads
    return hkv, model.num_heads // hkv, model.head_dim


def split_qkv(w: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused [(Hq + 2 Hkv) D, ...] -> q [Hq D, ...], k [Hkv D, ...], v [Hkv D, ...] (weights or biases)."""
    G, R, D = _heads(model)
    grouped = w.reshape(G, R + 2, D, *w.shape[1:])
    q = grouped[:, :R].reshape(G * R * D, *w.shape[1:])
    return q.contiguous(), grouped[:, R].reshape(G * D, *w.shape[1:]).contiguous(), \
        grouped[:, R + 1].reshape(G * D, *w.shape[1:]).contiguous()


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    G, R, D = _heads(model)
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(G, R, D, *rest), k.reshape(G, 1, D, *rest), v.reshape(G, 1, D, *rest)], dim=1)
    return grouped.reshape(G * (R + 2) * D, *rest).contiguous()


def split_kv(w: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused ``attn.kv`` [Hkv * 2 * D, ...] (per group [k_g, v_g]) -> k, v."""
    G, _, D = _heads(model)
    grouped = w.reshape(G, 2, D, *w.shape[1:])
    return grouped[:, 0].reshape(G * D, *w.shape[1:]).contiguous(), grouped[:, 1].reshape(G * D, *w.shape[1:]).contiguous()


def fuse_kv(k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    G, _, D = _heads(model)
    rest = k.shape[1:]
    return torch.stack([k.reshape(G, D, *rest), v.reshape(G, D, *rest)], dim=1).reshape(G * 2 * D, *rest).contiguous()


def _block_to_hf(i: int, key: str, value: torch.Tensor, model: ModelConfig, shared: bool, out: dict) -> None:
    p = f"model.layers.{i}."
    if key in _RENAMES:
        out[p + _RENAMES[key]] = value
    elif key.startswith("attn.qkv."):
        kind = key.rsplit(".", 1)[1]
        for name, part in zip(("q_proj", "k_proj", "v_proj"), split_qkv(value, model)):
            out[f"{p}self_attn.{name}.{kind}"] = part
    elif key.startswith("attn.q."):
        out[f"{p}self_attn.q_proj.{key.rsplit('.', 1)[1]}"] = value
    elif key.startswith("attn.kv."):
        kind = key.rsplit(".", 1)[1]
        k, v = split_kv(value, model)
        out[f"{p}self_attn.k_proj.{kind}"], out[f"{p}self_attn.v_proj.{kind}"] = k, v
    elif key.startswith("mlp.gate_up."):
        kind = key.rsplit(".", 1)[1]
        gate, up = value.chunk(2, dim=0)
        out[f"{p}mlp.gate_proj.{kind}"], out[f"{p}mlp.up_proj.{kind}"] = gate.contiguous(), up.contiguous()
    elif key.startswith("attn.encoding."):
        rest = key.removeprefix("attn.encoding.")
        if not shared:
            out[f"{p}self_attn.position.{rest}"] = value
        elif i == 0:                           # one copy of the shared instance
            out[SHARED_PREFIX + rest] = value
    else:
        raise KeyError(f"no Hugging Face name for megafire weight blocks.{i}.{key}")


def to_hf(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """megafire GPT state dict -> Hugging Face state dict (Llama names + ``position`` parameters)."""
    shared = is_shared_across_layers(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if (m := _LAYER.match(key)) is not None:
            _block_to_hf(int(m.group(1)), m.group(2), value, model, shared, out)
        elif key in _TOP:
            out[_TOP[key]] = value
        elif key.startswith("embedding.encoding."):
            out[EMBED_POSITIONS_PREFIX + key.removeprefix("embedding.encoding.")] = value
        else:
            raise KeyError(f"no Hugging Face name for megafire weight {key}")
    return {k: v.contiguous() for k, v in out.items()}


def _take(hf: dict, key: str) -> torch.Tensor:
    if key not in hf:
        raise KeyError(f"the Hugging Face weights lack {key}")
    return hf.pop(key)


def _block_from_hf(i: int, hf: dict, model: ModelConfig, fused_qkv: bool, out: dict) -> None:
    p = f"model.layers.{i}."
    for ours, theirs in _RENAMES.items():
        if p + theirs in hf:
            out[f"blocks.{i}.{ours}"] = hf.pop(p + theirs)
    kinds = ["weight"] + (["bias"] if model.linear_bias else [])
    for kind in kinds:
        q, k, v = (_take(hf, f"{p}self_attn.{n}_proj.{kind}") for n in "qkv")
        if fused_qkv:
            out[f"blocks.{i}.attn.qkv.{kind}"] = fuse_qkv(q, k, v, model)
        else:
            out[f"blocks.{i}.attn.q.{kind}"], out[f"blocks.{i}.attn.kv.{kind}"] = q, fuse_kv(k, v, model)
        gate, up = _take(hf, f"{p}mlp.gate_proj.{kind}"), _take(hf, f"{p}mlp.up_proj.{kind}")
        out[f"blocks.{i}.mlp.gate_up.{kind}"] = torch.cat([gate, up], dim=0).contiguous()
    prefix = f"{p}self_attn.position."
    for key in [k for k in hf if k.startswith(prefix)]:
        out[f"blocks.{i}.attn.encoding.{key.removeprefix(prefix)}"] = hf.pop(key)


def from_hf(hf: dict[str, torch.Tensor], model: ModelConfig, *, fused_qkv: bool = True) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_hf`: Hugging Face state dict -> megafire GPT state dict.

    A shared encoding's single copy is given to every block (the GPT's state dict lists a
    shared module under each block that holds it). Unknown leftover keys are an error.
    """
    hf = dict(hf)
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP.items():
        if theirs in hf:
            out[ours] = hf.pop(theirs)
    for key in [k for k in hf if k.startswith(EMBED_POSITIONS_PREFIX)]:
        out["embedding.encoding." + key.removeprefix(EMBED_POSITIONS_PREFIX)] = hf.pop(key)
    shared = {k.removeprefix(SHARED_PREFIX): hf.pop(k) for k in [k for k in hf if k.startswith(SHARED_PREFIX)]}
    for i in range(model.num_layers):
        _block_from_hf(i, hf, model, fused_qkv, out)
        for rest, value in shared.items():
            out[f"blocks.{i}.attn.encoding.{rest}"] = value
    if model.tie_embeddings:
        hf.pop("lm_head.weight", None)         # some writers store the tied copy too
    if hf:
        raise KeyError(f"Hugging Face weights with no megafire counterpart: {sorted(hf)[:8]}")
    return out
