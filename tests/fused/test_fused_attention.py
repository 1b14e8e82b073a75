"""Fused bias attention == float64 reference (output and every gradient).

CPU: Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) on tiny shapes: ragged
lengths (not multiples of the 16-wide interpreter blocks), GQA, segment masks, batched
positions, decoding (Tq < Tk). GPU tests are marked ``gpu``.

Tolerances (fp32 inputs on CPU): 1e-5 relative for the exact encodings. FIRE's kernel
computes the MLP's interpolant on ``G + 1`` nodes: it is compared to that interpolant at
1e-5 (the kernel logic), and to the true MLP through the documented error bound (forward)
and measured gradient errors (test_fire_interpolation_error).
"""
from __future__ import annotations

import math

import pytest
import torch

from fused_fireapprox import interp_bias, kink_bound
from fused_ref import build, double_copy, reference

triton = pytest.importorskip("triton")

from megafire.attention.fused import FIRE_GRID, fused_bias_attention, supports  # noqa: E402

ENCS = ["none", "alibi", "kerple_log", "kerple_power", "t5", "fire"]


def _rel(a, b):
    if a is None or b is None:  # no gradient path (e.g. L_mult without a threshold)
        a = torch.zeros(()) if a is None else a
        b = torch.zeros(()) if b is None else b
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 1e-9 else (a - b).abs().max().item()


class _Interp:
    """FIRE with f replaced by the kernel's interpolant (float64): the function the kernel computes."""

    def __init__(self, enc, grid):
        self.enc, self.grid = enc, grid

    def bias(self, q_pos, k_pos):
        return interp_bias(self.enc, q_pos, k_pos, self.grid)


def _encoding(name, H, **opts):
    if name == "none":
        return None
    if name == "fire":
        opts.setdefault("init_L", 9.0)
    enc = build(name, H, 16, **opts)
    if name == "t5":  # tiny lengths reach the log buckets and the constant tail
        enc = build(name, H, 16, num_buckets=8, max_distance=12)
    return enc


def _run(name, *, B=2, Tq=21, Tk=21, H=2, HKV=1, D=16, causal=True, seg=False, batched_pos=False,
         offset=0, tol=1e-5, enc_opts=None):
    torch.manual_seed(hash((name, Tq, Tk, H, HKV, seg)) % 1000)
    enc = _encoding(name, H, **(enc_opts or {}))
    q = torch.randn(B, Tq, H, D, requires_grad=True)
    k = torch.randn(B, Tk, HKV, D, requires_grad=True)
    v = torch.randn(B, Tk, HKV, D, requires_grad=True)
    kp = torch.arange(Tk) + offset
    qp = kp[Tk - Tq:]
    sq = sk = None
    if batched_pos or seg:
        # packed documents: batch 0 has two documents (positions restart), batch 1 one
        cut = Tk // 3
        kp = torch.stack([torch.cat([torch.arange(cut), torch.arange(Tk - cut)]), torch.arange(Tk)]) + offset
        qp = kp[:, Tk - Tq:]
        if seg:
            sk = torch.stack([torch.cat([torch.zeros(cut), torch.ones(Tk - cut)]), torch.zeros(Tk)]).long()
            sq = sk[:, Tk - Tq:]
    out = fused_bias_attention(q, k, v, enc, qp, kp, causal=causal, segment_ids_q=sq, segment_ids_k=sk)
    do = torch.randn_like(out)
    out.backward(do)
    e64 = double_copy(enc)
    ref_enc = _Interp(e64, FIRE_GRID) if name == "fire" else e64
    q2, k2, v2 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(q2, k2, v2, ref_enc, qp, kp, causal=causal, seg_q=sq, seg_k=sk)
    ref.backward(do.double())
    errs = {"out": _rel(out, ref), "dq": _rel(q.grad, q2.grad), "dk": _rel(k.grad, k2.grad),
            "dv": _rel(v.grad, v2.grad)}
    if enc is not None:
        for (n, p), (_, p2) in zip(enc.named_parameters(), e64.named_parameters()):
            if p.requires_grad:
                # no path (L_mult without a threshold, c without the log): None or exactly zero
                if p.grad is None or p2.grad is None:
                    assert all(g is None or not g.any() for g in (p.grad, p2.grad)), n
                errs[n] = _rel(p.grad, p2.grad)
    # FIRE's c and L gradients weigh dS by the interpolant's slope, which jumps at grid nodes:
    # a score whose x lands within fp32 rounding of a node may take the other cell's slope.
    loose = {"c_raw", "L_mult"} if name == "fire" else set()
    bad = {n: e for n, e in errs.items() if not (e <= (2e-3 if n in loose else tol))}
    assert not bad, f"{name}: {errs}"
    return errs


@pytest.mark.parametrize("name", ENCS)
def test_gqa_ragged(name):
    """Odd length 21 (two blocks + tail), GQA 4:2, causal, every encoding, every gradient."""
    H, HKV = (2, 1) if name == "fire" else (4, 2)
    _run(name, B=1, Tq=21, Tk=21, H=H, HKV=HKV)


@pytest.mark.parametrize("name", ["alibi", "t5", "fire"])
def test_segments_batched_positions(name):
    """Packed documents: [B, T] positions that restart, segment-id masks."""
    _run(name, B=2, Tq=19, Tk=19, seg=True)


@pytest.mark.parametrize("name", ["kerple_log", "fire"])
def test_decode_offset(name):
    """Tq < Tk, positions offset (KV-cache style): end-aligned causal mask, FIRE rows >= L."""
    _run(name, B=1, Tq=5, Tk=23, offset=7)


def test_non_causal_and_fire_ablations():
    _run("kerple_power", B=1, Tq=17, Tk=17, causal=False)
    _run("fire", B=1, Tq=17, Tk=17, enc_opts=dict(use_log=False))
    _run("fire", B=1, Tq=17, Tk=17, enc_opts=dict(use_threshold=False))


def test_supports():
    assert supports(None)
    for name in ENCS[1:]:
        assert supports(_encoding(name, 2))
    assert not supports(build("fire", 2, 16, progressive=False))
    assert not supports(build("rope", 2, 16))


@pytest.mark.parametrize("train_len", [512, 2048])
def test_fire_interpolation_error(train_len):
    """FIRE's interpolant at every evaluated length (1x..16x the training length, L = T/4):
    forward error within the stated bound; parameter-gradient error measured and bounded.

    Gradients (random dS on sampled rows, float64): the output layer is within 1e-3; the
    hidden layer, c and L see the MLP's kinks smeared over one grid cell: their relative
    error is bounded here at 1.5e-1 (typically 1e-2..7e-2 at G=128); c and L only sanity-bounded
    (up to ~0.9 relative under random dS: a known gap, see docs/kernels.md).
    """
    torch.manual_seed(0)
    enc = build("fire", 4, 64, init_L=train_len / 4).double()
    bound = kink_bound(enc, FIRE_GRID)
    for mult in (1, 2, 4, 8, 16):
        n = train_len * mult
        rows = torch.cat([torch.tensor([0, 1, n // 8 - 1, n - 1]), torch.randint(0, n, (12,))])
        kp = torch.arange(n)
        exact = enc.bias(rows, kp).detach()
        approx = interp_bias(enc, rows, kp, FIRE_GRID)
        err = (approx - exact).abs().amax((1, 2))
        assert bool((err <= bound * (1 + 1e-6) + 1e-12).all()), (mult, err, bound)
    n = train_len * 4
    rows = torch.randint(0, n, (24,))
    kp = torch.arange(n)
    ds = torch.randn(enc.num_heads_local, 24, n, dtype=torch.float64) * (kp[None, None] <= rows[None, :, None])
    grads = []
    for fn in (lambda: enc.bias(rows, kp), lambda: interp_bias(enc, rows, kp, FIRE_GRID)):
        enc.zero_grad()
        (fn() * ds).sum().backward()
        grads.append({n_: p.grad.clone() for n_, p in enc.named_parameters()})
    assert _rel(grads[1]["mlp.2.weight"], grads[0]["mlp.2.weight"]) < 1e-3
    for name in ("mlp.0.weight", "mlp.0.bias"):
        assert _rel(grads[1][name], grads[0][name]) < 1.5e-1, name
    # c and L: sums of dS * f'(x) * dx/dtheta that cancel strongly under random dS; the
    # interpolant's piecewise-constant slope moves them by up to ~0.9 relative here
    # (KNOWN GAP, docs/kernels.md): only a sanity bound.
    for name in ("c_raw", "L_mult"):
        assert _rel(grads[1][name], grads[0][name]) < 1.0, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("name", ENCS)
def test_gpu_bf16(name, D):
    """bf16 on the GPU vs the float32 reference: rel err <= 1e-2 for out and every gradient."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    B, T, H, HKV = 2, 777, 8, 2
    enc = None if name == "none" else build(name, H, D, **({"init_L": 128.0} if name == "fire" else {})).to(dev)
    q = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, HKV, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, HKV, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(T, device=dev)
    out = fused_bias_attention(q, k, v, enc, pos, pos)
    do = torch.randn_like(out)
    out.backward(do)
    import copy
    e2 = copy.deepcopy(enc) if enc is not None else None
    for p in ([] if e2 is None else e2.parameters()):
        p.grad = None
    ref_enc = _Interp(e2, FIRE_GRID) if name == "fire" else e2
    qs, ks, vs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = reference(qs, ks, vs, ref_enc, pos, pos)
    ref.backward(do.float())
    assert _rel(out, ref) < 1e-2 and _rel(q.grad, qs.grad) < 1e-2
    assert _rel(k.grad, ks.grad) < 1e-2 and _rel(v.grad, vs.grad) < 1e-2
    if enc is not None:
        for (n, p), (_, p2) in zip(enc.named_parameters(), e2.named_parameters()):
            if p.requires_grad:
                assert _rel(p.grad, p2.grad) < 1e-2, (n, _rel(p.grad, p2.grad))
    assert math.isfinite(out.float().sum().item())
