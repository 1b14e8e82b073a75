"""The ``flex`` backend: torch's FlexAttention with the encoding's bias as a ``score_mod``.

Same maths, layout and masking as :mod:`megafire.attention.reference`::

    s[h, i, j] = (q[h, i] . k[g(h), j]) * scale + bias[h, i, j]
    o[h, i]    = softmax_j(s[h, i, j] where allowed(i, j), else -inf) @ v[g(h)]

but the bias is never materialized: ``score_mod(s, b, h, i, j)`` computes it per score from
the captured position tensors (``q_pos[b, i]``, ``k_pos[b, j]``; positions are only read,
never made here), and ``allowed`` is a ``BlockMask`` from a ``mask_mod`` (causal by index,
``j <= i + Tk - Tq``, and same segment id). With ``d = max(q_pos - k_pos, 0)``:

* ``alibi``:         ``-m_h d``
* ``kerple_log``:    ``-r1_h log(1 + r2_h d)``
* ``kerple_power``:  ``-r1_h exp(r2_h log d)`` for ``d > 0``, 0 at ``d = 0``
* ``t5``:            ``W[bucket(min(d, M)), h]``: one ``[H, M + 1]`` table of bias per distance
  is built outside the kernel (``bucket(d) = bucket(M)`` for every ``d >= M``)
* ``fire`` (depth 1): the MLP ``f_h(x) = b2_h + sum_u W2[h, u] relu(w1_u x + b1_u)`` is piecewise
  linear with kinks ``k_u = -b1_u / w1_u``; PyTorch sorts the kinks and builds, differentiably,
  ``A[h, s]``, ``D[h, s]`` with ``f_h(x) = A[h, s] x + D[h, s]`` on segment ``s`` (= the number
  of kinks below ``x``; the tables of :mod:`megafire.attention.fused._fire_tables`). The
  score_mod counts the kinks below ``x`` (W compares) and reads ``A``, ``D`` once each: exact,
  and two grad-requiring captures instead of the ~3W per-unit ones of an unrolled MLP (whose
  compile took minutes). ``x = psi(d) / n(i)``, ``psi(d) = log(1 + c d)``, the per-row
  normaliser ``n(i) = psi(max(L, q_pos[i])) + eps`` computed outside by the module itself; the
  ablations (``use_log``, ``use_threshold``, ``progressive``) follow the module.
* no bias (none / absolute / rotary after rotation): no ``score_mod``.

Parameter gradients: FlexAttention differentiates a captured tensor only through an
*index* with the score's (b, h, i, j) (it scatter-adds one gradient per score), and its
Triton backward refuses a grad-requiring tensor indexed more than once ("Using multiple
indexing operations on the same tensor that requires gradients ..."). So every
grad-requiring capture here is a separate tensor read exactly once per score: scalars
(FIRE's c) are repeated over the heads and read at ``[h]``; autograd outside the kernel sums
them back (and maps FIRE's ``A``, ``D`` tables back to the MLP weights). FIRE with ``depth > 1`` would need
``width^2`` such captures and is refused (:func:`flex_unsupported_reason`).

Devices: on CUDA, ``torch.compile(flex_attention)`` (FlexAttention is only fast compiled) and
a compiled ``create_block_mask``. On CPU the eager (dense, materialized) implementation runs
forward only: torch's FlexAttention has no CPU backward ("FlexAttention does not support
backward on CPU"), so asking for a gradient there is a ConfigError.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megafire.config import ConfigError
from megafire.positional.alibi import ALiBi
from megafire.positional.base import PositionalEncoding
from megafire.positional.fire import FIRE
from megafire.positional.kerple import KerpleLog, KerplePower
from megafire.positional.t5 import T5RelativeBias, t5_causal_bucket

from .reference import _check_shapes

#: bias encodings with a score_mod here (exact types: a subclass may change the bias)
SUPPORTED = {ALiBi: "alibi", KerpleLog: "kerple_log", KerplePower: "kerple_power", T5RelativeBias: "t5",
             FIRE: "fire"}
_compiled_flex = None
_compiled_block_mask = None
_mask_cache: dict = {}
_MASK_CACHE_SIZE = 8


def flex_unsupported_reason(encoding: Optional[PositionalEncoding]) -> Optional[str]:
    """Why the flex backend cannot compute this encoding's bias (and its gradients); None if it can."""
    if encoding is None or encoding.kind != "bias":
        return None
    if type(encoding) not in SUPPORTED:
        return (f"no FlexAttention score_mod for encoding {encoding.name!r} "
                f"(flex supports {', '.join(SUPPORTED.values())} and encodings without a bias)")
    if isinstance(encoding, FIRE) and encoding.depth > 1:
        return (f"FIRE with depth={encoding.depth} > 1 would need width^2 = {encoding.width ** 2} separately "
                f"captured weights in the score_mod (FlexAttention differentiates a captured tensor "
                f"through one index per score); flex supports FIRE depth 1")
    return None


def flex_available() -> Optional[str]:
    """None when torch has FlexAttention, else why not."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as e:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention ({e})"
    return None


# --- score_mods -------------------------------------------------------------------------
def _relative(q_pos: torch.Tensor, k_pos: torch.Tensor) -> Callable:
    """(b, i, j) -> max(q_pos[i] - k_pos[j], 0) for [T] or [B, T] positions (as the module's bias)."""
    if q_pos.dim() != k_pos.dim() or q_pos.dim() not in (1, 2):
        raise ValueError(f"q_pos and k_pos must both be [T] or [B, T], got {tuple(q_pos.shape)}, {tuple(k_pos.shape)}")
    qp, kp = q_pos.long(), k_pos.long()
    if qp.dim() == 1:
        return lambda b, i, j: (qp[i] - kp[j]).clamp_min(0)
    return lambda b, i, j: (qp[b, i] - kp[b, j]).clamp_min(0)


def _row(x: torch.Tensor) -> Callable:
    """(b, i) -> x[i] or x[b, i] for a per-query-row tensor [Tq] | [B, Tq]."""
    return (lambda b, i: x[i]) if x.dim() == 1 else (lambda b, i: x[b, i])


def _per_head(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A fresh [H] copy of a scalar: read at [h], once per score, so flex can scatter its gradient."""
    return x.reshape(1).expand(num_heads).clone()


def _alibi(enc: ALiBi, rel, dtype):
    slopes = enc.slopes.to(dtype)                                    # [H]; a buffer, no gradient
    return lambda s, b, h, i, j: s - slopes[h] * rel(b, i, j).to(dtype), []


def _kerple(enc, rel, dtype):
    r1, r2 = enc.r1.to(dtype), enc.r2.to(dtype)                      # [H] each, fresh tensors
    if isinstance(enc, KerpleLog):
        def score_mod(s, b, h, i, j):
            return s - r1[h] * torch.log1p(r2[h] * rel(b, i, j).to(dtype))
    else:
        def score_mod(s, b, h, i, j):
            d = rel(b, i, j).to(dtype)
            # exp(r2 log d) on d >= 1 and 0 at d = 0, as the module (pow's r2-gradient is nan at 0)
            return s + torch.where(d > 0, -r1[h] * torch.exp(r2[h] * torch.log(d.clamp_min(1.0))), 0.0)
    return score_mod, [r1, r2]


def _t5(enc: T5RelativeBias, rel, dtype, device):
    # bias per distance 0..M by the module's own bucket function; every d >= M shares bucket(M)
    M = enc.max_distance
    bucket = t5_causal_bucket(torch.arange(M + 1, device=device), enc.num_buckets, M)   # [M + 1]
    table = enc.relative_attention_bias.weight.to(dtype)            # [buckets, H]
    by_distance = F.embedding(bucket, table).t().contiguous()       # [H, M + 1]
    return lambda s, b, h, i, j: s + by_distance[h, rel(b, i, j).clamp_max(M)], [by_distance]


def fire_segment_tables(w1: torch.Tensor, b1: torch.Tensor, W2: torch.Tensor, b2: torch.Tensor):
    """(A, D [H, W + 1], sorted kinks [W], sort order [W]) of a depth-1 FIRE MLP, differentiable
    in the weights (sort + cumsum; the maths in :mod:`megafire.attention.fused._fire_tables`)."""
    nz = w1 != 0
    kink = torch.where(nz, -b1 / torch.where(nz, w1, torch.ones_like(w1)), torch.full_like(w1, float("inf")))
    ks, order = torch.sort(kink.detach(), stable=True)
    w1s, b1s, W2s = w1[order], b1[order], W2[:, order]
    neg = (w1 < 0).to(w1.dtype)
    A0 = W2 @ (w1 * neg)                                             # below every kink: the w1 < 0 units are on
    D0 = b2 + W2 @ (b1 * neg + F.relu(b1) * (~nz).to(w1.dtype))
    A = torch.cat([A0[:, None], A0[:, None] + (W2s * w1s.abs()).cumsum(1)], 1)
    D = torch.cat([D0[:, None], D0[:, None] + (W2s * b1s * torch.sign(w1s)).cumsum(1)], 1)
    return A, D, ks, order


def _fire(enc: FIRE, rel, q_pos, dtype):
    H, hidden, out = enc.num_heads_local, enc.mlp[0], enc.mlp[-1]
    captured = []

    def cap(t):
        captured.append(t)
        return t
    if enc.use_log:
        c = cap(_per_head(enc.c.to(dtype), H))
    if enc.progressive:                                              # n(i) = psi(max(L, q_pos[i])) + eps, [(B,) Tq]
        norm = _row(cap(enc.psi(torch.maximum(q_pos.to(dtype), enc.L.to(dtype))) + enc.eps))
    A, D, ks, _ = fire_segment_tables(hidden.weight[:, 0].to(dtype), hidden.bias.to(dtype), out.weight.to(dtype),
                                      out.bias.to(dtype))
    A, D = cap(A), cap(D)                                            # [H, W + 1] each
    width = ks.numel()

    def score_mod(s, b, h, i, j):
        d = rel(b, i, j).to(dtype)
        x = torch.log1p(c[h] * d) if enc.use_log else d
        if enc.progressive:
            x = x / norm(b, i)
        seg = (x > ks[0]).to(torch.int64)                            # segment = number of kinks below x
        for t in range(1, width):
            seg = seg + (x > ks[t]).to(torch.int64)
        return s + A[h, seg] * x + D[h, seg]
    return score_mod, captured


def build_score_mod(encoding: Optional[PositionalEncoding], q_pos: torch.Tensor, k_pos: torch.Tensor):
    """(score_mod or None, captured tensors that may require grad) for an encoding."""
    if encoding is None or encoding.kind != "bias":
        return None, []
    why = flex_unsupported_reason(encoding)
    if why is not None:
        raise ConfigError(f"attention.backend=flex is impossible: {why}. Use reference, fused or auto")
    params = list(encoding.parameters()) + list(encoding.buffers())
    dtype = torch.promote_types(params[0].dtype if params else torch.float32, torch.float32)
    rel = _relative(q_pos, k_pos)
    if isinstance(encoding, ALiBi):
        return _alibi(encoding, rel, dtype)
    if isinstance(encoding, (KerpleLog, KerplePower)):
        return _kerple(encoding, rel, dtype)
    if isinstance(encoding, T5RelativeBias):
        return _t5(encoding, rel, dtype, q_pos.device)
    return _fire(encoding, rel, q_pos, dtype)


# --- masks ------------------------------------------------------------------------------
def _mask_mod(causal: bool, offset: int, seg_q: Optional[torch.Tensor], seg_k: Optional[torch.Tensor]):
    """allowed(b, i, j) of the reference (causal by index, aligned at the end; same segment)."""
    from torch.nn.attention.flex_attention import and_masks
    mods = []
    if causal:
        mods.append(lambda b, h, i, j: j <= i + offset)
    if seg_q is not None or seg_k is not None:
        if seg_q is None or seg_k is None:
            raise ValueError("segment ids must be given for both queries and keys, or for neither")
        if seg_q.dim() == 1:
            mods.append(lambda b, h, i, j: seg_q[i] == seg_k[j])
        else:
            mods.append(lambda b, h, i, j: seg_q[b, i] == seg_k[b, j])
    return and_masks(*mods) if mods else None


def _cache_key(tq, tk, causal, device, seg_q, seg_k):
    if torch.compiler.is_compiling():
        return None
    key = (tq, tk, causal, str(device))
    for seg in (seg_q, seg_k):
        if seg is not None:
            if seg.is_inference():                                   # no version counter to trust
                return None
            key += (id(seg), seg._version)
    return key


def _block_mask(tq, tk, device, causal, seg_q, seg_k):
    """The BlockMask (None = every score allowed); cached so the layers of one step share it.
    The cache holds the segment tensors, so an id in a key cannot be reused by another tensor."""
    mask_mod = _mask_mod(causal, tk - tq, seg_q, seg_k)
    if mask_mod is None:
        return None
    key = _cache_key(tq, tk, causal, device, seg_q, seg_k)
    if key is not None and key in _mask_cache:
        return _mask_cache[key][-1]
    global _compiled_block_mask
    from torch.nn.attention.flex_attention import create_block_mask
    batch = seg_q.shape[0] if seg_q is not None and seg_q.dim() == 2 else None
    if device.type == "cuda":
        # the eager version materializes all B x Tq x Tk mask values; compiled it works per block
        if _compiled_block_mask is None:
            _compiled_block_mask = torch.compile(create_block_mask)
        mask = _compiled_block_mask(mask_mod, batch, None, tq, tk, device=device)
    else:
        mask = create_block_mask(mask_mod, batch, None, tq, tk, device=device)
    if key is not None:
        if len(_mask_cache) >= _MASK_CACHE_SIZE:
            _mask_cache.pop(next(iter(_mask_cache)))
        _mask_cache[key] = (seg_q, seg_k, mask)
    return mask


# --- the backend --------------------------------------------------------------------------
def _backward_supported(device_type: str) -> bool:
    """torch's FlexAttention has a backward on CUDA (compiled Triton), not on CPU."""
    return device_type != "cpu"


def _flex_call(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention
    if device_type != "cuda":
        return flex_attention                                        # eager: dense maths, any device
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def flex_attention_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      encoding: Optional[PositionalEncoding], q_pos: torch.Tensor, k_pos: torch.Tensor, *,
                      causal: bool = True, segment_ids_q: Optional[torch.Tensor] = None,
                      segment_ids_k: Optional[torch.Tensor] = None,
                      softmax_scale: Optional[float] = None) -> torch.Tensor:
    """q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D] -> o [B, Tq, Hq, D] in q's dtype (maths: module doc)."""
    _check_shapes(q, k, v)
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    device = q.device
    if device.type == "cuda" and D < 16:
        raise ConfigError(f"attention.backend=flex needs head_dim >= 16 on CUDA (Triton's tl.dot), got {D}; "
                          f"use reference, sdpa or fused")
    score_mod, captured = build_score_mod(encoding, q_pos, k_pos)
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *captured))
    if wants_grad and not _backward_supported(device.type):
        raise ConfigError(f"attention.backend=flex cannot compute gradients on {device.type!r}: torch "
                          f"{torch.__version__} FlexAttention has no backward there ('FlexAttention does not "
                          f"support backward on CPU'); train with attention.backend=reference or auto "
                          f"(flex runs forward only on CPU)")
    if not wants_grad:   # torch's CPU guard looks at requires_grad even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    block_mask = _block_mask(Tq, Tk, device, causal, segment_ids_q, segment_ids_k)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    with warnings.catch_warnings():
        # eager off CUDA is deliberate (dense maths); torch warns that it is not the fast path
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = _flex_call(device.type)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),   # [B, H, T, D]
                                      score_mod=score_mod, block_mask=block_mask, scale=scale,
                                      enable_gqa=Hq != Hkv)
    return out.transpose(1, 2).to(q.dtype)                          # [B, Tq, Hq, D]
