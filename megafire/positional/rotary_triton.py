"""Fused rotary embedding: q and k rotated in one Triton launch, forward and backward.

``fused_rotary(q, k, q_pos, k_pos, inv_freq, attention_scaling, rotary_dim)`` equals
:meth:`megafire.positional.rope.RoPE.rotate`'s torch path (rotate-half layout, transformers'
``apply_rotary_pos_emb``) to rounding, for every scaling: the kernel only consumes what the
module computes (``inv_freq`` [rotary_dim/2] fp32, dynamic NTK's included, and the attention
factor ``a``). Per token it evaluates ``theta = float(p) * w`` and ``a cos``, ``a sin`` in fp32
in registers (no [T, r] cos/sin tensors), once for all heads, then for each head

    out[:r/2] = x1 a cos - x2 a sin,   out[r/2:r] = x2 a cos + x1 a sin,   out[r:] = x[r:]

in fp32, stored in the input dtype (fp32, fp16, bf16). The backward is the rotation by
``-theta`` (the transpose), again one launch for dq and dk. Positions are [T] or [B, T] per
tensor, q and k independently (decoding offsets, packed documents); q and k may have
different head counts (GQA) and any strides but a unit last one.

Where it can differ from the torch path: the GPU may contract ``x1 c - x2 s`` into an FMA
(one fp32 rounding fewer), so bf16/fp16 outputs can differ by one unit in the last place
in rare elements; cos/sin come from libdevice on CUDA, the same functions torch calls.

Triton is imported on first use (``_rotary_kernels``), so megafire imports without it.
``python3 -m megafire.cli bench rotary`` times this against the torch path (and sweeps the
token block; ``MEGAFIRE_ROTARY_BLOCK_T=N`` overrides the default one).
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: elements of one [BLOCK_T, BLOCK_H, BLOCK_HALF] half-tile: 32 tokens x 16 heads x 32 at D = 64
#: (H100, B*T = 16k, H = 12, D = 64, bf16, fwd+bwd: 0.41 ms at 32 tokens vs 0.63 at 8, 0.46 at 16;
#: docs/benchmarks.md)
TILE_ELEMENTS = 16384
MAX_BLOCK_H = 16


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    """The kernels module, (re)imported so that it matches the current TRITON_INTERPRET."""
    from . import _rotary_kernels as K
    if K.INTERPRET != interpreting():
        K = importlib.reload(K)
    return K


@functools.lru_cache(maxsize=1)
def triton_import_error() -> Optional[str]:
    """None when the kernels can be imported, else why not (a CPU-only install without Triton)."""
    try:
        _kernels()
    except Exception as e:  # a broken Triton install raises more than ImportError
        return f"{type(e).__name__}: {e}"
    return None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def launch_config(half: int, q_heads: int, k_heads: int, block_t: Optional[int] = None) -> dict:
    """Block sizes: all of a head's rotated half per tile, heads in blocks of <= 16, tokens to fill the tile."""
    block_half = _next_pow2(half)
    block_hq, block_hk = (min(_next_pow2(h), MAX_BLOCK_H) for h in (q_heads, k_heads))
    block_t = block_t or int(os.environ.get("MEGAFIRE_ROTARY_BLOCK_T", "0"))   # tuning without edits
    if not block_t:
        block_t = max(1, min(64, TILE_ELEMENTS // (max(block_hq, block_hk) * block_half)))
    return dict(BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half)


def _positions(pos: torch.Tensor, x: torch.Tensor, name: str) -> tuple[torch.Tensor, int, int]:
    """pos [T] | [1, T] | [B, T] for x [B, T, H, D] -> (pos on x's device, batch stride, token stride)."""
    B, T = x.shape[:2]
    if pos.dim() not in (1, 2) or pos.shape[-1] != T or (pos.dim() == 2 and pos.shape[0] not in (1, B)):
        raise ValueError(f"{name} must be [T] or [B, T] for x of shape {tuple(x.shape)}, got {tuple(pos.shape)}")
    if pos.dtype.is_floating_point or pos.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {pos.dtype}")
    pos = pos.to(x.device)
    if pos.dim() == 1:
        return pos, 0, pos.stride(0)
    return pos, (pos.stride(0) if pos.shape[0] > 1 else 0), pos.stride(1)


def _launch(q, k, q_pos, k_pos, inv_freq, scale: float, rotary_dim: int, inverse: bool,
            block_t: Optional[int] = None, num_warps: int = 4):
    """q [B, Tq, Hq, D], k [B, Tk, Hk, D] -> contiguous rotated copies (inverse: by -theta)."""
    K = _kernels()
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    q_pos, qpb, qpt = _positions(q_pos, q, "q_pos")
    k_pos, kpb, kpt = _positions(k_pos, k, "k_pos")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    (B, Tq, Hq, D), (_, Tk, Hk, _) = q.shape, k.shape
    half = rotary_dim // 2
    cfg = launch_config(half, Hq, Hk, block_t)
    num_q_programs = _cdiv(B * Tq, cfg["BLOCK_T"])
    grid = (num_q_programs + _cdiv(B * Tk, cfg["BLOCK_T"]),)
    if grid[0] == 0:
        return q_out, k_out
    K.rotary_kernel[grid](
        q, k, q_out, k_out, q_pos, k_pos, inv_freq, float(scale),
        B * Tq, B * Tk, Tq, Tk, num_q_programs,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qpb, qpt, kpb, kpt, NUM_HQ=Hq, NUM_HK=Hk,
        HALF=half, TAIL=D - rotary_dim, INVERSE=inverse, PRECISE=not K.INTERPRET,
        BLOCK_TAIL=_next_pow2(max(D - rotary_dim, 1)), num_warps=num_warps, **cfg)
    return q_out, k_out


class _FusedRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, q_pos, k_pos, inv_freq, scale, rotary_dim, block_t):
        ctx.save_for_backward(q_pos, k_pos, inv_freq)
        ctx.scale, ctx.rotary_dim, ctx.block_t = scale, rotary_dim, block_t
        return _launch(q, k, q_pos, k_pos, inv_freq, scale, rotary_dim, inverse=False, block_t=block_t)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        q_pos, k_pos, inv_freq = ctx.saved_tensors
        dq, dk = _launch(dq_out, dk_out, q_pos, k_pos, inv_freq, ctx.scale, ctx.rotary_dim, inverse=True,
                         block_t=ctx.block_t)
        return dq, dk, None, None, None, None, None, None


def fused_rotary(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                 inv_freq: torch.Tensor, attention_scaling: float, rotary_dim: int,
                 block_t: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Tq, Hq, D], k [B, Tk, Hk, D]; q_pos [Tq] | [B, Tq]; k_pos [Tk] | [B, Tk]; inv_freq
    [rotary_dim/2] -> rotated (q, k), contiguous, input dtypes; differentiable in q and k."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must be [B, T, H, D] with the same B and D, got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fused rotary supports {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}")
    if rotary_dim % 2 or not 2 <= rotary_dim <= q.shape[-1] or inv_freq.numel() != rotary_dim // 2:
        raise ValueError(f"rotary_dim={rotary_dim} must be even, <= head_dim={q.shape[-1]} and match "
                         f"inv_freq [{inv_freq.numel()}]")
    inv_freq = inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
    return _FusedRotary.apply(q, k, q_pos, k_pos, inv_freq, float(attention_scaling), int(rotary_dim), block_t)
