"""Float64 reference for the fused kernels: materialized bias, masks, softmax (tests only)."""
from __future__ import annotations

import copy

import torch


def build(name: str, heads: int, head_dim: int = 16, **opts):
    from megafire.positional import build_encoding
    torch.manual_seed(0)
    enc = build_encoding(name, num_heads=heads, head_dim=head_dim, **opts)
    return enc


def reference(q, k, v, enc, q_pos, k_pos, *, causal=True, seg_q=None, seg_k=None, scale=None):
    """All float64; returns out [B, Tq, H, D]; grads flow to q, k, v and enc's parameters."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    rep = H // Hkv
    kk = k.repeat_interleave(rep, dim=2)
    vv = v.repeat_interleave(rep, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if enc is not None:
        bias = enc.bias(q_pos, k_pos).to(s.dtype)
        s = s + (bias if bias.dim() == 4 else bias.unsqueeze(0))
    qp = q_pos if q_pos.dim() == 2 else q_pos.unsqueeze(0).expand(B, -1)
    kp = k_pos if k_pos.dim() == 2 else k_pos.unsqueeze(0).expand(B, -1)
    valid = torch.ones(B, Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(Tq, device=q.device).view(-1, 1)
        j = torch.arange(Tk, device=q.device).view(1, -1)
        valid &= (j <= i + (Tk - Tq)).unsqueeze(0)
        valid &= kp.unsqueeze(1) <= qp.unsqueeze(2)
    if seg_q is not None:
        sq = seg_q if seg_q.dim() == 2 else seg_q.unsqueeze(0).expand(B, -1)
        sk = seg_k if seg_k.dim() == 2 else seg_k.unsqueeze(0).expand(B, -1)
        valid &= sq.unsqueeze(2) == sk.unsqueeze(1)
    valid = valid.unsqueeze(1)
    s = s.masked_fill(~valid, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.where(valid.any(-1, keepdim=True), p, torch.zeros_like(p))
    return torch.einsum("bhqk,bkhd->bqhd", p, vv)


def double_copy(enc):
    return None if enc is None else copy.deepcopy(enc).double()
