"""Autograd wrapper around the Triton kernels; see the package docstring for the maths."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import _kernels as K

#: FIRE interpolation grid: G cells (G + 1 nodes) uniform on x in [0, 1].
FIRE_GRID = 128

#: Launch configuration per (device kind, head dim); "interp" is used under TRITON_INTERPRET.
#: keys: fwd (BM, BN, warps, stages), dq (BM, BN, warps, stages), dkdv (BM, BN, warps, stages)
CONFIGS = {
    "interp": dict(fwd=(16, 16, 4, 1), dq=(16, 16, 4, 1), dkdv=(16, 16, 4, 1)),
    64: dict(fwd=(128, 64, 4, 3), dq=(64, 64, 4, 2), dkdv=(64, 64, 4, 2)),
    128: dict(fwd=(128, 64, 8, 3), dq=(64, 64, 4, 2), dkdv=(64, 64, 8, 2)),
}


def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(d: int) -> dict:
    if _interp():
        return CONFIGS["interp"]
    return CONFIGS.get(d, CONFIGS[128] if d > 64 else CONFIGS[64])


_NAMES = {"alibi": K.ALIBI, "kerple_log": K.KERPLE_LOG, "kerple_power": K.KERPLE_POW, "t5": K.T5, "fire": K.FIRE}


def supports(encoding) -> bool:
    """True when the fused kernels implement this encoding (bias kind, known name/options)."""
    if encoding is None:
        return True
    name = getattr(encoding, "name", None)
    if name not in _NAMES or getattr(encoding, "kind", "bias") != "bias":
        return False
    if name == "fire" and not getattr(encoding, "progressive", True):
        return False  # raw psi(i - j) input is unbounded: no [0, 1] grid
    return True


def _t5_lut(enc, device) -> tuple[torch.Tensor, int]:
    rt = int(enc.max_distance)
    rel = torch.arange(rt + 1, device=device)
    try:
        from megafire.positional.t5 import t5_causal_bucket
        lut = t5_causal_bucket(rel, enc.num_buckets, enc.max_distance)
    except ImportError:  # pragma: no cover - literal fallback
        nb, md = enc.num_buckets, enc.max_distance
        exact = nb // 2
        sc = (torch.log(rel.clamp_min(exact).float() / exact) / math.log(md / exact) * (nb - exact)).long()
        lut = torch.where(rel < exact, rel, (exact + sc).clamp_max(nb - 1))
    return lut.to(torch.int32).contiguous(), rt


@dataclass
class Spec:
    mode: int
    p0: Optional[torch.Tensor] = None   # [H] alibi slope / kerple r1
    p1: Optional[torch.Tensor] = None   # [H] kerple r2
    tab: Optional[torch.Tensor] = None  # [H, NT(+1)] t5 table / fire node values
    sc: Optional[torch.Tensor] = None   # [2] fire (c, L)
    lut: Optional[torch.Tensor] = None  # [RT + 1] t5 buckets
    nt: int = 1
    rt: int = 0
    eps: float = 0.0
    use_log: bool = True
    use_thr: bool = True


def encoding_spec(encoding, device, grid: Optional[int] = None) -> Spec:
    """The kernel's view of an encoding: differentiable small tensors built in PyTorch."""
    if encoding is None:
        return Spec(K.NONE)
    name = encoding.name
    f32 = dict(device=device, dtype=torch.float32)
    if name == "alibi":
        return Spec(K.ALIBI, p0=encoding.slopes.to(**f32).contiguous())
    if name in ("kerple_log", "kerple_power"):
        return Spec(_NAMES[name], p0=encoding.r1.to(**f32).contiguous(), p1=encoding.r2.to(**f32).contiguous())
    if name == "t5":
        lut, rt = _t5_lut(encoding, device)
        tab = encoding.relative_attention_bias.weight.to(**f32).t().contiguous()  # [H, buckets]
        return Spec(K.T5, tab=tab, lut=lut, nt=int(encoding.num_buckets), rt=rt)
    if name == "fire":
        g = int(grid or FIRE_GRID)
        nodes = torch.linspace(0.0, 1.0, g + 1, **f32)
        tab = encoding.mlp_forward(nodes).to(torch.float32).t().contiguous()  # [H, G + 1]
        sc = torch.stack([encoding.c.to(**f32).reshape(()), encoding.L.to(**f32).reshape(())])
        return Spec(K.FIRE, tab=tab, sc=sc, nt=g, eps=float(encoding.eps),
                    use_log=bool(encoding.use_log), use_thr=bool(encoding.use_threshold))
    raise ValueError(f"fused attention does not support encoding {name!r}")


def _pos(p: torch.Tensor, B: int, T: int, name: str) -> tuple[torch.Tensor, int]:
    if p.dim() == 1:
        if p.shape[0] != T:
            raise ValueError(f"{name} has length {p.shape[0]}, expected {T}")
        return p.to(torch.int32).contiguous(), 0
    if p.dim() == 2 and p.shape[1] == T and p.shape[0] in (1, B):
        p = p.to(torch.int32).contiguous()
        return p, (T if p.shape[0] == B else 0)
    raise ValueError(f"{name} must be [T] or [B, T], got {tuple(p.shape)}")


def _dummy(device, dtype=torch.float32):
    return torch.zeros(4, device=device, dtype=dtype)


class _FusedBiasAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, p0, p1, tab, sc, qp, kp, sq, sk, lut, meta):
        mode, nt, rt, eps, use_log, use_thr, causal, scale = meta
        B, Tq, H, D = q.shape
        Tk, HKV = k.shape[1], k.shape[2]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        dev = q.device
        (qp, qp_sb), (kp, kp_sb) = _pos(qp, B, Tq, "q_pos"), _pos(kp, B, Tk, "k_pos")
        has_seg = sq is not None
        if has_seg:
            (sq, sq_sb), (sk, sk_sb) = _pos(sq, B, Tq, "segment_ids_q"), _pos(sk, B, Tk, "segment_ids_k")
        else:
            sq, sk, sq_sb, sk_sb = qp, kp, 0, 0
        d = _dummy(dev)
        args_t = [x if x is not None else d for x in (p0, p1, tab, sc)]
        lut_t = lut if lut is not None else torch.zeros(4, device=dev, dtype=torch.int32)
        tab_stride = tab.stride(0) if tab is not None else 0
        o = torch.empty_like(q)
        lse = torch.empty(B, H, Tq, device=dev, dtype=torch.float32)
        BM, BN, warps, stages = _config(D)["fwd"]
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        grid = (triton_cdiv(Tq, BM), B * H)
        K._fwd_kernel[grid](
            q, k, v, o, lse, qp, kp, sq, sk, *args_t[:3], lut_t, args_t[3],
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            qp_sb, kp_sb, sq_sb, sk_sb,
            H, H // HKV, Tq, Tk, tab_stride, nt, rt, scale * K.LOG2E, eps,
            BIAS=mode, CAUSAL=causal, HAS_SEG=has_seg, USE_LOG=use_log, USE_THR=use_thr, DOT_PREC=prec,
            D=D, BM=BM, BN=BN, num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, o, lse, qp, kp, sq, sk, lut_t, *args_t)
        ctx.meta = meta
        ctx.strides = (qp_sb, kp_sb, sq_sb, sk_sb)
        ctx.has_seg = has_seg
        ctx.present = tuple(x is not None for x in (p0, p1, tab, sc))
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, qp, kp, sq, sk, lut, p0, p1, tab, sc = ctx.saved_tensors
        mode, nt, rt, eps, use_log, use_thr, causal, scale = ctx.meta
        qp_sb, kp_sb, sq_sb, sk_sb = ctx.strides
        B, Tq, H, D = q.shape
        Tk, HKV = k.shape[1], k.shape[2]
        do = do.contiguous()
        dev = q.device
        delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, Tq]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        tab_stride = tab.stride(0) if ctx.present[2] else 0
        need = ctx.needs_input_grad
        pgrad = mode in (K.KERPLE_LOG, K.KERPLE_POW) and (need[3] or need[4]) or \
            mode == K.T5 and need[5] or mode == K.FIRE and (need[5] or need[6])
        common = dict(BIAS=mode, CAUSAL=causal, HAS_SEG=ctx.has_seg, USE_LOG=use_log, USE_THR=use_thr,
                      DOT_PREC=prec, D=D)
        cfg = _config(D)
        BM, BN, warps, stages = cfg["dq"]
        nmb = triton_cdiv(Tq, BM)
        part_stride = nt + 3
        part = torch.zeros(B * H * nmb, part_stride, device=dev, dtype=torch.float32) if pgrad else _dummy(dev)
        strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
                   qp_sb, kp_sb, sq_sb, sk_sb)
        K._bwd_dq_kernel[(nmb, B * H)](
            q, k, v, do, dq, lse, delta, qp, kp, sq, sk, p0, p1, tab, lut, sc, part, *strides,
            H, H // HKV, Tq, Tk, tab_stride, nt, rt, scale * K.LOG2E, scale, eps, part_stride,
            PGRAD=pgrad, BM=BM, BN=BN, num_warps=warps, num_stages=stages, **common)
        BM, BN, warps, stages = cfg["dkdv"]
        K._bwd_dkdv_kernel[(triton_cdiv(Tk, BN), B * HKV)](
            q, k, v, do, dk, dv, lse, delta, qp, kp, sq, sk, p0, p1, tab, lut, sc, *strides,
            H, HKV, H // HKV, Tq, Tk, tab_stride, nt, rt, scale * K.LOG2E, scale, eps,
            BM=BM, BN=BN, num_warps=warps, num_stages=stages, **common)
        g0 = g1 = gtab = gsc = None
        if pgrad:
            part = part.view(B, H, nmb, part_stride).sum((0, 2))  # [H, part_stride]
            if mode in (K.KERPLE_LOG, K.KERPLE_POW):
                g0, g1 = part[:, 0].contiguous(), part[:, 1].contiguous()
            elif mode == K.T5:
                gtab = part[:, :nt].contiguous()
            else:
                gtab = part[:, :nt + 1].contiguous()
                gsc = torch.stack([part[:, nt + 1].sum(), part[:, nt + 2].sum()])
        return (dq, dk, dv, g0, g1, gtab, gsc) + (None,) * 6


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def fused_bias_attention(q, k, v, encoding, q_pos, k_pos, *, causal: bool = True,
                         segment_ids_q=None, segment_ids_k=None, softmax_scale: Optional[float] = None,
                         fire_grid: Optional[int] = None):
    """Attention with a position bias computed inside Triton kernels (see package docstring)."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Tq, H, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or H % k.shape[2]:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)} (Hq must be a multiple of Hkv)")
    if D not in (16, 32, 64, 128):
        raise ValueError(f"head dim {D} not supported (16, 32, 64, 128)")
    if (segment_ids_q is None) != (segment_ids_k is None):
        raise ValueError("give both segment_ids_q and segment_ids_k, or neither")
    if not supports(encoding):
        raise ValueError(f"fused attention does not support encoding {getattr(encoding, 'name', encoding)!r}")
    if encoding is not None and getattr(encoding, "num_heads_local", H) != H:
        raise ValueError(f"encoding has {encoding.num_heads_local} local heads, q has {H}")
    spec = encoding_spec(encoding, q.device, fire_grid)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    meta = (spec.mode, spec.nt, spec.rt, spec.eps, spec.use_log, spec.use_thr, bool(causal), scale)
    return _FusedBiasAttention.apply(q, k, v, spec.p0, spec.p1, spec.tab, spec.sc, q_pos, k_pos,
                                     segment_ids_q, segment_ids_k, spec.lut, meta)
