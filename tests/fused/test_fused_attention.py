"""Fused bias attention == float64 reference (output and every gradient).

CPU: Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) on tiny shapes: ragged
lengths (not multiples of the 16-wide interpreter blocks), GQA, segment masks, batched
positions, decoding (Tq < Tk). GPU tests are marked ``gpu``.

Tolerances (fp32 inputs on CPU): 1e-5 relative for out, dq, dk, dv and every parameter
gradient, every encoding (FIRE is exact: segment tables of its piecewise-linear MLP);
FIRE's ``c_raw``, ``L_mult`` 5e-4 (cancelling sums over all scores).
"""
from __future__ import annotations

import math

import pytest
import torch

from fused_ref import build, double_copy, reference

triton = pytest.importorskip("triton")

from megafire.attention.fused import fused_bias_attention, supports  # noqa: E402

ENCS = ["none", "alibi", "kerple_log", "kerple_power", "t5", "fire"]


def _rel(a, b):
    if a is None or b is None:  # no gradient path (e.g. L_mult without a threshold)
        a = torch.zeros(()) if a is None else a
        b = torch.zeros(()) if b is None else b
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 1e-9 else (a - b).abs().max().item()


def kinks_inside(enc, lo=0.02, hi=0.9, seed=1):
    """Move every hidden unit's kink -b1/w1 into [lo, hi] (so they cross tiles), half of the
    units increasing (w1 > 0), half decreasing."""
    g = torch.Generator().manual_seed(seed)
    w1 = enc.mlp[0].weight
    with torch.no_grad():
        n = w1.shape[0]
        mag = 0.5 + torch.rand(n, generator=g)
        sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
        w1.copy_((mag * sign).view_as(w1))
        kink = lo + (hi - lo) * torch.rand(n, generator=g)
        enc.mlp[0].bias.copy_(-kink * w1.view(-1))
    return enc


def _encoding(name, H, kinks=False, **opts):
    if name == "none":
        return None
    if name == "fire":
        opts.setdefault("init_L", 9.0)
    enc = build(name, H, 16, **opts)
    if kinks:
        kinks_inside(enc)
    if name == "t5":  # tiny lengths reach the log buckets and the constant tail
        enc = build(name, H, 16, num_buckets=8, max_distance=12)
    return enc


def _packed(Tk, cuts):
    """Positions restarting at each cut and segment ids 0, 1, ... ([Tk] each): one packed row."""
    starts = [0, *cuts]
    pos = torch.cat([torch.arange(e - s) for s, e in zip(starts, [*cuts, Tk])])
    seg = torch.cat([torch.full((e - s,), i) for i, (s, e) in enumerate(zip(starts, [*cuts, Tk]))])
    return pos, seg.long()


def _run(name, *, B=2, Tq=21, Tk=21, H=2, HKV=1, D=16, causal=True, seg=False, batched_pos=False,
         offset=0, tol=1e-5, enc_opts=None, kinks=False, cuts=None, gap=0):
    torch.manual_seed(hash((name, Tq, Tk, H, HKV, seg)) % 1000)
    enc = _encoding(name, H, kinks=kinks, **(enc_opts or {}))
    q = torch.randn(B, Tq, H, D, requires_grad=True)
    k = torch.randn(B, Tk, HKV, D, requires_grad=True)
    v = torch.randn(B, Tk, HKV, D, requires_grad=True)
    kp = torch.arange(Tk) + offset + gap * (torch.arange(Tk) >= Tk // 2)   # gap: positions jump mid-row
    qp = kp[Tk - Tq:]
    sq = sk = None
    if batched_pos or seg:
        # packed documents: batch 0 has two documents (positions restart), batch 1 one
        p0, s0 = _packed(Tk, cuts or [Tk // 3])
        kp = torch.stack([p0, torch.arange(Tk)]) + offset
        qp = kp[:, Tk - Tq:]
        if seg:
            sk = torch.stack([s0, torch.zeros(Tk, dtype=torch.long)])
            sq = sk[:, Tk - Tq:]
    out = fused_bias_attention(q, k, v, enc, qp, kp, causal=causal, segment_ids_q=sq, segment_ids_k=sk)
    do = torch.randn_like(out)
    out.backward(do)
    e64 = double_copy(enc)
    ref_enc = e64
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
    # c, L: sums of dS f'(x) dx/d(c, L) over all scores that cancel strongly under random dO
    loose = {"c_raw", "L_mult"} if name == "fire" else set()
    bad = {n: e for n, e in errs.items() if not (e <= (max(tol, 5e-4) if n in loose else tol))}
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


@pytest.mark.parametrize("name,ku", [("none", "1"), ("alibi", "1"), ("kerple_log", "1"), ("t5", "1"), ("t5", "32"),
                                     ("fire", "1"), ("fire", "32")])
def test_packed_documents_dead_tiles(name, ku, monkeypatch):
    """Four packed documents in batch row 0 (positions restart, 16-wide blocks): the query
    blocks of the later documents start their key loops past the earlier documents' blocks
    (dead tiles skipped), the key blocks end theirs before the later documents; row 1 is one
    document. T5 / FIRE: light and heavy loops (KU). Equal to the reference, every gradient."""
    monkeypatch.setenv("MEGAFIRE_FUSED_KU", ku)
    _run(name, B=2, Tq=75, Tk=75, seg=True, cuts=[9, 33, 52], kinks=(name == "fire"))


@pytest.mark.parametrize("name", ["none", "t5"])
def test_dead_tiles_are_not_computed(name):
    """The skip is real: NaN values in the keys of key blocks 0-2 (documents 0-2; 16-wide blocks)
    reach every query block that computes those tiles (0 * NaN in P V), and none of the last
    query block [64, 75) (document 3: its loop starts at key block 3), forward and dQ."""
    T = 75
    pos, seg = _packed(T, [9, 33, 52])
    q, k, v = (torch.randn(1, T, 2, 16) for _ in range(3))
    v[:, :48] = float("nan")
    q.requires_grad_()
    enc = _encoding(name, 2)
    out = fused_bias_attention(q, k, v, enc, pos[None], pos[None], segment_ids_q=seg[None], segment_ids_k=seg[None])
    assert out[0, :64].isnan().any(dim=-1).all()          # computed tiles with NaN values: NaN rows
    assert out[0, 64:].isfinite().all()
    out[0, 64:].sum().backward()
    assert q.grad[0, 64:].isfinite().all()


@pytest.mark.parametrize("name", ["rope", "nope", "learned"])
def test_fused_backend_for_encodings_without_bias(name):
    """``attention.backend=fused`` with an encoding that adds no bias (RoPE rotates q, k before
    the call; NoPE; absolute embeddings at the input): the dispatch's fused function runs the
    kernels with no bias term, equal to the reference backend with the same encoding (packed
    documents, output and q/k/v gradients)."""
    from megafire.attention.dispatch import fused_attention
    from megafire.attention.reference import reference_attention
    from megafire.positional import build_encoding

    enc = build_encoding(name, num_heads=2, head_dim=16)
    T = 40
    pos, seg = _packed(T, [11, 27])
    q, k, v = (torch.randn(2, T, 2, 16).requires_grad_() for _ in range(3))
    kw = dict(causal=True, segment_ids_q=seg[None], segment_ids_k=seg[None])
    out = fused_attention(q, k, v, enc, pos[None], pos[None], **kw)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q2, k2, v2, enc.double(), pos[None], pos[None], **kw)
    ref_grads = torch.autograd.grad(ref, (q2, k2, v2), g.double())
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        assert _rel(a, b) < 1e-5


def test_auto_without_bias_picks_the_kernel_per_call(monkeypatch):
    """``auto`` for an encoding without a bias on CUDA (dispatch.sdpa_or_fused_attention): packed
    documents (segment ids, Tq == Tk, a compiled head dim) go to the fused kernels, everything
    else to SDPA; each branch equals the float64 reference with the same masks (output and
    q/k/v gradients). Which branch ran is counted, so a wrong routing fails even when both
    would give the same numbers."""
    from megafire.attention import dispatch
    from megafire.attention.reference import reference_attention

    calls = {"fused": 0, "sdpa": 0}

    def spy(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapped
    monkeypatch.setattr(dispatch, "fused_attention", spy("fused", dispatch.fused_attention))
    monkeypatch.setattr(dispatch, "sdpa_attention", spy("sdpa", dispatch.sdpa_attention))

    def check(Tq, Tk, D, segments, expect):
        T = Tk
        pos, seg = _packed(T, [11, 27])
        q = torch.randn(2, Tq, 2, D).requires_grad_()
        k, v = (torch.randn(2, Tk, 2, D).requires_grad_() for _ in range(2))
        kw = dict(causal=True, segment_ids_q=seg[None, T - Tq:].expand(2, -1) if segments else None,
                  segment_ids_k=seg[None].expand(2, -1) if segments else None)
        before = dict(calls)
        out = dispatch.sdpa_or_fused_attention(q, k, v, None, pos[None, T - Tq:], pos[None], **kw)
        assert {n: calls[n] - before[n] for n in calls} == {n: int(n == expect) for n in calls}
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
        q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = reference_attention(q2, k2, v2, None, pos[None, T - Tq:], pos[None], **kw)
        ref_grads = torch.autograd.grad(ref, (q2, k2, v2), g.double())
        for a, b in zip((out, *grads), (ref, *ref_grads)):
            assert _rel(a, b) < 1e-5

    check(40, 40, 16, True, "fused")       # the trainer's packed rows
    check(40, 40, 16, False, "sdpa")       # one document: SDPA-flash with is_causal on a GPU
    check(8, 40, 16, True, "sdpa")         # decoding / a KV cache: not a square block
    check(40, 40, 24, True, "sdpa")        # a head dim the kernels do not compile for


def test_tile_tables_packed_documents():
    """T5's tile tables of packed documents against a literal computation from the positions:
    each tile's bucket range is that of its own pairs' distances (``t5_causal_bucket`` of
    ``max(min qpos - max kpos, 0)`` and of ``max qpos - min kpos`` over the two blocks), so a
    tile inside one document spans only the buckets its distances reach, whatever the
    positions did earlier in the row; the first live key block of each query block (KST) and
    one past the last live query block of each key block (QEN) are those whose segments meet."""
    from types import SimpleNamespace

    from megafire.attention.fused import _function as Fn
    from megafire.attention.fused import _kernels as K
    from megafire.positional.t5 import t5_causal_bucket

    T, BS, H = 75, 16, 2
    pos, seg = _packed(T, [9, 33, 52])
    qp = torch.stack([pos, torch.arange(T)]).to(torch.int32)
    sg = torch.stack([seg, torch.zeros(T, dtype=torch.long)])
    enc = _encoding("t5", H)
    it, rt = Fn._t5_tables_for(enc.num_buckets, enc.max_distance, "cpu")
    ft = Fn._t5_forward_table(enc.relative_attention_bias.weight.detach(), enc.num_buckets, enc.max_distance)
    st = SimpleNamespace(table=True, tables={}, tab_bsz=2, qp=qp, kp=qp, has_seg=True, sq=sg, sk=sg,
                         dummy_i=torch.zeros(4, dtype=torch.int32), causal=True, eps=0.0, ku=1, mode=K.T5,
                         ft=ft, it=it, sc=torch.zeros(4), NS=enc.num_buckets, RT=rt, use_log=False, segb=False)
    tt, _ta, _spl, _spc = Fn._tile_tables(st, H, T, T, BS, BS)
    kst, qen = Fn._live_ranges(st, T, T, BS, BS)
    nb = -(-T // BS)
    tt, kst, qen = tt.view(2, nb, nb), kst.view(2, nb), qen.view(2, nb)

    def bucket(r):
        return int(t5_causal_bucket(torch.tensor(r), enc.num_buckets, enc.max_distance))

    blocks = [slice(i * BS, min(T, i * BS + BS)) for i in range(nb)]
    for b in range(2):
        meets = [[bool(set(sg[b, qs].tolist()) & set(sg[b, ks].tolist())) for ks in blocks] for qs in blocks]
        for qb, qs in enumerate(blocks):
            assert int(kst[b, qb]) == min(kb for kb in range(nb) if meets[qb][kb]), (b, qb)
            assert int(qen[b, qb]) == 1 + max(i for i in range(nb) if meets[i][qb]), (b, qb)
            for kb, ks in enumerate(blocks):
                r = qp[b, qs, None].long() - qp[b, None, ks].long()
                rec = int(tt[b, qb, kb])
                want = (bucket(max(int(r.min()), 0)), bucket(max(int(r.max()), 0)))
                assert (rec & 4095, (rec >> 12) & 4095) == want, (b, qb, kb)
    # the last document's query block [64, 75) starts at key block 3 ([48, 64) holds its first keys)
    assert int(kst[0, nb - 1]) == 3 and not kst[1].any()


@pytest.mark.parametrize("rowwise", [True, False])
def test_tile_tables_segment_bounds(rowwise):
    """``segment_bounds``: where a query block and a key block share exactly one segment id, the
    tile's bucket range is that of the pairs inside that segment (literal, from the positions),
    not of the whole blocks; elsewhere it covers every pair. Blocks of 16 straddle the restarts at
    9, 33 and 52, and the shared-position case (one positions row for every batch row) is run too."""
    from types import SimpleNamespace

    from megafire.attention.fused import _function as Fn
    from megafire.attention.fused import _kernels as K
    from megafire.positional.t5 import t5_causal_bucket

    T, BS, H = 75, 16, 2
    pos, seg = _packed(T, [9, 33, 52])
    qp = torch.stack([pos, torch.arange(T)]).to(torch.int32) if rowwise else torch.arange(T, dtype=torch.int32)
    sg = torch.stack([seg, torch.zeros(T, dtype=torch.long)]) if rowwise else torch.stack([seg, seg])
    enc = _encoding("t5", H)
    it, rt = Fn._t5_tables_for(enc.num_buckets, enc.max_distance, "cpu")
    ft = Fn._t5_forward_table(enc.relative_attention_bias.weight.detach(), enc.num_buckets, enc.max_distance)
    recs = {}
    for segb in (False, True):
        st = SimpleNamespace(table=True, tables={}, tab_bsz=2, qp=qp, kp=qp, has_seg=True, sq=sg, sk=sg,
                             dummy_i=torch.zeros(4, dtype=torch.int32), causal=True, eps=0.0, ku=1, mode=K.T5,
                             ft=ft, it=it, sc=torch.zeros(4), NS=enc.num_buckets, RT=rt, use_log=False, segb=segb)
        recs[segb] = Fn._tile_tables(st, H, T, T, BS, BS)[0].view(2, -1)

    def bucket(r):
        return int(t5_causal_bucket(torch.tensor(r), enc.num_buckets, enc.max_distance))

    nb = -(-T // BS)
    blocks = [slice(i * BS, min(T, i * BS + BS)) for i in range(nb)]
    narrowed = 0
    for b in range(2):
        p = qp[b] if rowwise else qp
        for qb, qs in enumerate(blocks):
            for kb, ks in enumerate(blocks[:qb + 1]):
                common = set(sg[b, qs].tolist()) & set(sg[b, ks].tolist())
                r = p[qs, None].long() - p[None, ks].long()
                same = sg[b, qs, None] == sg[b, None, ks]
                old, new = recs[False][b, qb * nb + kb], recs[True][b, qb * nb + kb]
                got = (int(new) & 4095, (int(new) >> 12) & 4095)
                if len(common) == 1:
                    live = r[same]
                    assert got == (bucket(max(int(live.min()), 0)), bucket(max(int(live.max()), 0))), (b, qb, kb)
                    narrowed += got != (int(old) & 4095, (int(old) >> 12) & 4095)
                else:   # two shared segments (or none: dead tile): the whole blocks' bounds
                    assert int(new) == int(old), (b, qb, kb)
                assert (int(new) >> 24) == (int(old) >> 24)   # the mask decision is unchanged
    if rowwise:   # restarting positions: the straddling key blocks' tiles against later documents' queries
        assert narrowed >= 3, narrowed


@pytest.mark.parametrize("ku", ["1", "32"])
@pytest.mark.parametrize("name", ["t5", "fire"])
def test_segment_bounds_equal_the_reference(name, ku, monkeypatch):
    """The narrower tile bounds give the same outputs and every gradient as the float64 reference
    (packed documents, light and heavy loops, a decode offset with segments)."""
    from megafire.attention.fused import CONFIGS
    monkeypatch.setitem(CONFIGS, "interp", dict(CONFIGS["interp"], segment_bounds=True))
    monkeypatch.setenv("MEGAFIRE_FUSED_KU", ku)
    _run(name, B=2, Tq=75, Tk=75, seg=True, cuts=[9, 33, 52], kinks=(name == "fire"))
    _run(name, B=2, Tq=19, Tk=19, seg=True)


@pytest.mark.parametrize("name", ["kerple_log", "fire"])
def test_decode_offset(name):
    """Tq < Tk, positions offset (KV-cache style): end-aligned causal mask, FIRE rows >= L."""
    _run(name, B=1, Tq=5, Tk=23, offset=7)


def test_non_causal_and_fire_ablations():
    _run("kerple_power", B=1, Tq=17, Tk=17, causal=False)
    _run("t5", B=1, Tq=23, Tk=23, causal=False)
    _run("fire", B=1, Tq=19, Tk=19, causal=False, kinks=True)
    _run("fire", B=2, Tq=18, Tk=18, batched_pos=True, kinks=True)
    _run("fire", B=1, Tq=17, Tk=17, enc_opts=dict(use_log=False))
    _run("fire", B=1, Tq=17, Tk=17, enc_opts=dict(use_threshold=False))


def test_supports():
    assert supports(None)
    for name in ENCS[1:]:
        assert supports(_encoding(name, 2))
    assert not supports(build("fire", 2, 16, progressive=False))
    assert not supports(build("rope", 2, 16))


@pytest.mark.parametrize("use_log,use_threshold", [(True, True), (False, True), (True, False)])
def test_fire_kinks_crossing_tiles(use_log, use_threshold):
    """Every kink inside [0.02, 0.9]: many kinks cross the 16x16 interpreter tiles (the
    per-score crossing path and the per-kink gradient sums); ragged length, GQA group 2, rows both
    below and above L."""
    _run("fire", B=1, Tq=40, Tk=40, H=2, HKV=1, kinks=True,
         enc_opts=dict(use_log=use_log, use_threshold=use_threshold, init_L=20.0))


def test_fire_kinks_decode_segments():
    _run("fire", B=2, Tq=19, Tk=19, seg=True, kinks=True)
    _run("fire", B=1, Tq=7, Tk=33, offset=5, kinks=True)


@pytest.mark.parametrize("name", ["fire", "t5", "kerple_log"])
def test_half_inputs_resid_delta(name):
    """fp16 inputs (the interpreter cannot run bf16 dots): the forward also stores the output's
    rounding residual, so delta = dO . O is that of the fp32 output and the parameter
    gradients (sums of dS) are not spoiled by the rounded O (FIRE kinks crossing tiles)."""
    torch.manual_seed(3)
    H, T = 2, 45
    enc = _encoding(name, H, kinks=(name == "fire"))
    q = torch.randn(1, T, H, 16).half().requires_grad_()
    k = torch.randn(1, T, 1, 16).half().requires_grad_()
    v = torch.randn(1, T, 1, 16).half().requires_grad_()
    pos = torch.arange(T)
    out = fused_bias_attention(q, k, v, enc, pos, pos)
    do = torch.randn_like(out)
    out.backward(do)
    e64 = double_copy(enc)
    q2, k2, v2 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference(q2, k2, v2, e64, pos, pos).backward(do.double())
    errs = {n: _rel(p.grad, p2.grad) for (n, p), (_, p2) in zip(enc.named_parameters(), e64.named_parameters())
            if n != "mlp.2.bias"}  # b2's true gradient is 0 (softmax shift): abs error below
    assert max(errs.values()) < 3e-3, errs
    if name == "fire":
        assert enc.mlp[2].bias.grad.abs().max() < 1e-2


@pytest.mark.parametrize("name", ["t5", "fire"])
def test_tile_tables_other_geometry(name, monkeypatch):
    """Tile tables of a different launch geometry per kernel (fwd 32x16, dq 16x32, dkdv 32x32)."""
    from megafire.attention.fused import CONFIGS
    monkeypatch.setitem(CONFIGS, "interp", dict(CONFIGS["interp"], fwd=(32, 16, 4, 1), dq=(16, 32, 4, 1),
                                                dkdv=(32, 32, 4, 1)))
    _run(name, B=2, Tq=37, Tk=37, seg=True, kinks=(name == "fire"))
    _run(name, B=1, Tq=6, Tk=35, offset=3, kinks=(name == "fire"))


@pytest.mark.parametrize("ku", ["1", "32"])
@pytest.mark.parametrize("name", ["t5", "fire"])
def test_light_and_heavy_tile_loops(name, ku, monkeypatch):
    """KU = 1: most kink / boundary tiles are heavy (general second loop); KU = 32: every tile
    takes the unrolled blocks of the pipelined loop. Both equal the reference."""
    monkeypatch.setenv("MEGAFIRE_FUSED_KU", ku)
    _run(name, B=2, Tq=37, Tk=37, seg=True, kinks=(name == "fire"))
    _run(name, B=1, Tq=6, Tk=35, offset=3, kinks=(name == "fire"))


def _record_launches(monkeypatch, flag):
    """Record ``(kernel name, its launch's keyword `flag`)`` of every fused launch from now on."""
    from megafire.attention.fused import _function
    seen = []
    real = _function.wrap_triton

    def recording(kernel):
        launch = real(kernel)

        class Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    seen.append((kernel.fn.__name__, kwargs.get(flag)))
                    return launch[grid](*args, **kwargs)
                return run
        return Grid()

    monkeypatch.setattr(_function, "wrap_triton", recording)
    return seen


ONEPASS = (16, 16, 4, 1)


@pytest.mark.parametrize("name", ENCS)
def test_onepass_backward(name, monkeypatch):
    """``onepass``: dQ, dK, dV and the parameter sums from one kernel (dQ added atomically per key
    block, FIRE's per-row sums too) equal the float64 reference: GQA with a ragged tail, packed
    documents (T5 / FIRE tiles on both loops; FIRE kinks crossing tiles), a decode offset, no
    causal mask; the launches show the one-pass kernel ran and the dq / dkdv kernels did not."""
    from megafire.attention.fused import CONFIGS
    monkeypatch.setitem(CONFIGS, "interp", dict(CONFIGS["interp"], onepass=ONEPASS))
    seen = _record_launches(monkeypatch, "PGRAD")
    kinks = name == "fire"
    H, HKV = (2, 1) if name == "fire" else (4, 2)
    _run(name, B=1, Tq=21, Tk=21, H=H, HKV=HKV)
    # 3e-5: Kerple-power's r1 gradient (sum dS r^r2, rows of dS summing to ~0) is 1.25e-5 from float64
    # on these inputs with the two-kernel backward too (fp32 summation order), 1.5e-5 here
    _run(name, B=2, Tq=75, Tk=75, seg=True, cuts=[9, 33, 52], kinks=kinks, tol=3e-5)
    _run(name, B=1, Tq=6, Tk=35, offset=3, kinks=kinks)
    _run(name, B=1, Tq=19, Tk=19, causal=False, kinks=kinks)
    names = {n for n, _ in seen}
    assert "_bwd_onepass_kernel" in names and not names & {"_bwd_dq_kernel", "_bwd_dkdv_kernel"}, names
    if name in ("kerple_log", "kerple_power", "t5", "fire"):
        assert ("_bwd_onepass_kernel", True) in seen


@pytest.mark.parametrize("name, onepass", [("kerple_log", False), ("fire", False), ("fire", True)])
def test_rcp_ex2(name, onepass, monkeypatch):
    """``rcp_ex2``: the ``r / (1 + c r)`` factor of Kerple-log's r2 and FIRE's c gradient as
    ``r 2^-lg`` (the bias' own log) in the dq and the one-pass kernels: every gradient equals the
    float64 reference (packed documents with FIRE kinks crossing tiles, a decode offset, FIRE
    without its threshold); the launches show the variant ran with parameter gradients on."""
    from megafire.attention.fused import CONFIGS
    opts = dict(CONFIGS["interp"], rcp_ex2=True)
    if onepass:
        opts["onepass"] = ONEPASS
    monkeypatch.setitem(CONFIGS, "interp", opts)
    seen = _record_launches(monkeypatch, "RCP_EX2")
    kinks = name == "fire"
    _run(name, B=2, Tq=75, Tk=75, seg=True, cuts=[9, 33, 52], kinks=kinks)
    _run(name, B=1, Tq=6, Tk=35, offset=3, kinks=kinks)
    if name == "fire":
        _run(name, B=1, Tq=17, Tk=17, kinks=True, enc_opts=dict(use_threshold=False))
    kernel = "_bwd_onepass_kernel" if onepass else "_bwd_dq_kernel"
    assert (kernel, True) in seen and (kernel, False) not in seen and (kernel, None) not in seen, seen


@pytest.mark.parametrize("name", ["none", "fire"])
def test_fold_mask_off(name, monkeypatch):
    """``fold_mask: false`` (the five-compare mask the folded one replaced; every other test runs
    the folded form): same outputs and gradients as the reference with a ragged tail, packed
    documents, a decode offset (Tq < Tk) and no causal mask, in the two-kernel and the one-pass
    backward; the launches show the unfolded variant ran."""
    from megafire.attention.fused import CONFIGS
    monkeypatch.setitem(CONFIGS, "interp", dict(CONFIGS["interp"], fold_mask=False))
    seen = _record_launches(monkeypatch, "FOLD")
    kinks = name == "fire"
    _run(name, B=2, Tq=75, Tk=75, seg=True, cuts=[9, 33, 52], kinks=kinks)
    _run(name, B=1, Tq=6, Tk=35, offset=3, kinks=kinks)
    _run(name, B=1, Tq=19, Tk=19, causal=False, kinks=kinks)
    monkeypatch.setitem(CONFIGS, "interp", dict(CONFIGS["interp"], onepass=ONEPASS))
    _run(name, B=2, Tq=37, Tk=37, seg=True, cuts=[11], kinks=kinks)
    kernels = {n for n, _ in seen}
    attn = {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_onepass_kernel"}
    assert attn <= kernels, kernels
    assert all(fold is False for n, fold in seen if n in attn), seen


@pytest.mark.parametrize("name, ku", [("t5", "4"), ("fire", "1"), ("fire", "4")])
def test_split_heavy(name, ku, monkeypatch):
    """``split_heavy``: the dq and dkdv kernels each run twice, light tiles (phase 1, fp32 partials)
    then heavy tiles (phase 2, adding the partials and FIRE's row sums): outputs and every gradient
    equal the float64 reference with nearly every tile heavy (FIRE, KU=1) and with light and heavy
    tiles in the same query / key blocks (KU=4: every run here has both), on packed documents, GQA,
    a decode offset, FIRE without kinks inside, and T5's ``defer``."""
    from megafire.attention.fused import CONFIGS
    monkeypatch.setitem(CONFIGS, "interp", dict(CONFIGS["interp"], split_heavy=True, segment_bounds=True,
                                                defer=True))
    monkeypatch.setenv("MEGAFIRE_FUSED_KU", ku)
    seen = _record_launches(monkeypatch, "PHASE")
    kinks = name == "fire"
    _run(name, B=2, Tq=75, Tk=75, seg=True, cuts=[9, 33, 52], kinks=kinks)
    _run(name, B=1, Tq=6, Tk=35, offset=3, kinks=kinks)
    _run(name, B=1, Tq=37, Tk=37, H=4, HKV=2, kinks=kinks)
    if name == "fire":
        _run(name, B=1, Tq=75, Tk=75)
    for kernel in ("_bwd_dq_kernel", "_bwd_dkdv_kernel"):
        assert (kernel, 1) in seen and (kernel, 2) in seen and (kernel, 0) not in seen, seen


@pytest.mark.parametrize("onepass,tile", [(False, (16, 16)), (True, (16, 16)), (False, (32, 16)), (True, (32, 16))],
                         ids=["dq", "onepass", "dq-tall", "onepass-tall"])
def test_t5_diag(onepass, tile, monkeypatch):
    """``t5_diag``: heavy T5 tiles whose live scores all have distance = index distance sum dS by
    diagonal into per-distance sums (``_t5_diagonals``), the others keep the boundary loop: every
    gradient equals the float64 reference on packed documents (positions restart: aligned), with a
    decode offset, GQA (the one-pass program reuses its scratch across heads) and positions that
    jump mid-row (tiles across the jump fail the check: both paths in one run); the per-distance
    sums are nonzero where tiles are aligned (the path ran) and carry the jump run's aligned tiles.
    Tiles taller than wide (the GPU's D=128 dq tile is 128x64) have more diagonals below the main
    one than above: the first version skewed by the width and lost them (GPU bf16 test, 2026-12-05)."""
    from megafire.attention.fused import CONFIGS
    import megafire.attention.fused._function as fn
    launch = (*tile, 4, 1)
    monkeypatch.setitem(CONFIGS, "interp", dict(CONFIGS["interp"], t5_diag=True, segment_bounds=True, defer=True,
                                                onepass=launch if onepass else None, dq=launch))
    dist = []
    fold = fn._t5_fold_distances

    def spy(tot, NS, it, RT):
        dist.append(float(tot[:, 2 * NS:].abs().sum()))
        return fold(tot, NS, it, RT)

    monkeypatch.setattr(fn, "_t5_fold_distances", spy)
    _run("t5", B=2, Tq=40, Tk=40, seg=True, cuts=[9, 23])
    _run("t5", B=1, Tq=6, Tk=35, offset=3)
    _run("t5", B=1, Tq=37, Tk=37, H=4, HKV=2)
    _run("t5", B=1, Tq=40, Tk=40, gap=5)
    assert len(dist) == 4 and min(dist) > 0, dist


def _t5_case(onepass, tile, band, *, T=40, Tq=None, gap=0, seg=True, H=2, HKV=1, corrupt=None, monkeypatch=None):
    """Output and every gradient of one T5 call (batch row 0: documents cut at 9 and 23, positions
    restarting; row 1: one document, its positions jumping by ``gap`` mid-row), with ``t5_band`` on or
    off; ``corrupt``: scale the band tables by it (the band path must then change what it computes)."""
    from megafire.attention.fused import CONFIGS
    import megafire.attention.fused._function as fn
    launch = (*tile, 4, 1)
    monkeypatch.setitem(CONFIGS, "interp", dict(CONFIGS["interp"], t5_band=band, t5_diag=True, segment_bounds=True,
                                                onepass=launch if onepass else None, dq=launch, dkdv=launch,
                                                fwd=launch))
    if corrupt is not None:
        orig = fn._band_table
        monkeypatch.setattr(fn, "_band_table",
                            lambda *a, **kw: (lambda r: (r[0] * corrupt, *r[1:]))(orig(*a, **kw)))
    torch.manual_seed(3)
    enc = _encoding("t5", H)
    with torch.no_grad():
        enc.relative_attention_bias.weight.normal_()
    Tq = Tq or T
    q = torch.randn(2, Tq, H, 16, requires_grad=True)
    k = torch.randn(2, T, HKV, 16, requires_grad=True)
    v = torch.randn(2, T, HKV, 16, requires_grad=True)
    p0, s0 = _packed(T, [9, 23])
    kp = torch.stack([p0, torch.arange(T) + gap * (torch.arange(T) >= T // 2)])
    sk = torch.stack([s0, torch.zeros(T, dtype=torch.long)]) if seg else None
    out = fused_bias_attention(q, k, v, enc, kp[:, T - Tq:], kp, segment_ids_q=None if sk is None else sk[:, T - Tq:],
                               segment_ids_k=sk)
    out.backward(torch.randn_like(out))
    if corrupt is not None:
        monkeypatch.setattr(fn, "_band_table", orig)
    return [out.detach(), q.grad, k.grad, v.grad, enc.relative_attention_bias.weight.grad]


@pytest.mark.parametrize("onepass,tile", [(False, (16, 16)), (True, (16, 16)),
                                          pytest.param(False, (32, 16), marks=pytest.mark.slow)],
                         ids=["dq", "onepass", "dq-tall"])   # tall tiles: test_band_table covers their bands
def test_t5_band(onepass, tile, monkeypatch):
    """``t5_band``: the heavy T5 tiles of aligned rows add band tiles (fwd, dq / one-pass, dkdv: keys x
    queries from a transposed table) holding the very fp32 values the per-score gather reads, so the
    output and every gradient are bit-identical to the gather's (packed documents, plain rows, a
    decode offset, GQA, tall tiles: BM != BN makes the bands step by gcd(BM, BN)). The band path runs:
    halving its tables changes the aligned rows' outputs and leaves a row whose positions jump (the
    fallback) bit-identical. And it equals the float64 reference (``_run``)."""
    for kw in (dict(), dict(Tq=33), dict(seg=False), dict(H=4, HKV=2)):
        off = _t5_case(onepass, tile, False, monkeypatch=monkeypatch, **kw)
        on = _t5_case(onepass, tile, True, monkeypatch=monkeypatch, **kw)
        assert all(torch.equal(a, b) for a, b in zip(off, on)), kw
    off = _t5_case(onepass, tile, False, gap=5, monkeypatch=monkeypatch)
    bad = _t5_case(onepass, tile, True, gap=5, corrupt=0.5, monkeypatch=monkeypatch)
    assert not torch.allclose(off[0][0], bad[0][0], atol=1e-3)        # row 0 aligned: the band path ran
    assert torch.equal(off[0][1], bad[0][1])                           # row 1 jumps: the gather
    from megafire.attention.fused import CONFIGS
    monkeypatch.setitem(CONFIGS, "interp", dict(CONFIGS["interp"], t5_band=True, t5_diag=True, segment_bounds=True,
                                                onepass=(*tile, 4, 1) if onepass else None, dq=(*tile, 4, 1)))
    _run("t5", B=2, Tq=40, Tk=40, seg=True, cuts=[9, 23])
    _run("t5", B=1, Tq=6, Tk=35, offset=3)


def _masked_case(name, onepass, run, *, T=40, gap=0, seg=True, first=None, monkeypatch=None):
    """Output and every gradient of one call of ``name`` (rows as in ``_t5_case``) with ``run_mask`` on
    or off; ``first``: replace the queries' first keys (``_first_keys``) by this (a wrong run)."""
    from megafire.attention.fused import CONFIGS
    import megafire.attention.fused._function as fn
    monkeypatch.setitem(CONFIGS, "interp", dict(CONFIGS["interp"], run_mask=run, segment_bounds=True,
                                                onepass=ONEPASS if onepass else None))
    if first is not None:
        monkeypatch.setattr(fn, "_first_keys", lambda sk, rows, Tq, Tk: torch.full((rows, Tq), first, dtype=torch.int32))
    torch.manual_seed(4)
    enc = _encoding(name, 2, kinks=name == "fire")
    q, k, v = (torch.randn(2, T, 2, 16, requires_grad=True) for _ in range(3))
    p0, s0 = _packed(T, [9, 23])
    kp = torch.stack([p0, torch.arange(T) + gap * (torch.arange(T) >= T // 2)])
    sk = torch.stack([s0, torch.zeros(T, dtype=torch.long)]) if seg else None
    out = fused_bias_attention(q, k, v, enc, kp, kp, segment_ids_q=sk, segment_ids_k=sk)
    out.backward(torch.randn_like(out))
    params = [] if enc is None else [p.grad for p in enc.parameters() if p.requires_grad and p.grad is not None]
    return [out.detach(), q.grad, k.grad, v.grad, *params]


#: the run mask is one helper for every encoding: ALiBi / Kerple (same masked-tile code as no bias) run with -m slow
RUN_ENCS = [pytest.param(n, marks=pytest.mark.slow) if n in ("alibi", "kerple_log", "kerple_power") else n
            for n in ENCS]


@pytest.mark.parametrize("onepass", [False, True], ids=["two_kernels", "onepass"])
@pytest.mark.parametrize("name", RUN_ENCS)
def test_run_mask(name, onepass, monkeypatch):
    """``run_mask``: on an aligned row a masked tile keeps the keys ``[first key of the query's segment,
    causal limit]`` (two compares per score, no key positions or segment ids), which is exactly the
    live set: output and every gradient bit-identical to the full mask, every encoding, both backward
    paths (a packed row and a row whose positions jump: both launches), plain rows for no bias and T5.
    The run mask runs: with the first keys all 0 the packed row attends across its documents and
    changes, while the row whose positions jump keeps the full mask (unchanged)."""
    off = _masked_case(name, onepass, False, gap=5, monkeypatch=monkeypatch)
    on = _masked_case(name, onepass, True, gap=5, monkeypatch=monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(off, on))
    if name in ("none", "t5"):   # plain rows, and the run path's reach (the kernels are the same for all)
        off2 = _masked_case(name, onepass, False, seg=False, monkeypatch=monkeypatch)
        on2 = _masked_case(name, onepass, True, seg=False, monkeypatch=monkeypatch)
        assert all(torch.equal(a, b) for a, b in zip(off2, on2))
        bad = _masked_case(name, onepass, True, gap=5, first=0, monkeypatch=monkeypatch)
        assert not torch.allclose(off[0][0], bad[0][0], atol=1e-3)
        assert torch.equal(off[0][1], bad[0][1])


def test_first_keys():
    """``_first_keys`` against rows written out: each query's first key of its run of equal segment ids
    (the queries the keys' last Tq; a row per batch element from shared ids)."""
    from megafire.attention.fused._function import _first_keys
    s = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    assert _first_keys(s, 2, 6, 6).tolist() == [[0, 0, 2, 2, 2, 5], [0] * 6]
    assert _first_keys(s, 2, 3, 6).tolist() == [[2, 2, 5], [0, 0, 0]]
    assert _first_keys(s[0], 3, 6, 6).tolist() == [[0, 0, 2, 2, 2, 5]] * 3


def test_aligned_rows():
    """``_aligned_rows`` (``t5_band``'s per-row flag) against rows written out: contiguous positions,
    positions restarting at each new (growing) segment id, a decode offset whose queries are the keys'
    last positions pass; a jump, a restart without a new segment, a segment id that comes back, queries
    that are not the keys' tail, more queries than keys fail. Shared [T] positions with [B, T]
    segment ids give a flag per batch row."""
    from megafire.attention.fused._function import _aligned_rows
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    p = i32([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7], [0, 1, 2, 0, 1], [0, 1, 2, 4, 5]])
    assert _aligned_rows(p, p, None, None, 5, 5).tolist() == [1, 1, 0, 0]
    p = i32([[0, 1, 2, 0, 1], [0, 1, 2, 0, 1], [0, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
    s = i32([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]])
    assert _aligned_rows(p, p, s, s, 5, 5).tolist() == [1, 0, 0, 1]
    kp = i32([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]])
    qp = i32([[2, 3, 4], [1, 2, 3]])
    assert _aligned_rows(qp, kp, None, None, 3, 5).tolist() == [1, 0]
    assert _aligned_rows(kp, kp[:, :3], None, None, 5, 3).tolist() == [0, 0]
    shared = i32([0, 1, 2, 0, 1])
    s = i32([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]])
    assert _aligned_rows(shared, shared, s, s, 5, 5).tolist() == [1, 0]


@pytest.mark.parametrize("tile,trans", [((16, 16), False), ((32, 16), False), ((32, 16), True), ((16, 64), False)])
@pytest.mark.parametrize("off", [0, 3])
def test_band_table(tile, trans, off):
    """``_band_table`` against its definition, for every tile a launch can hold: the tile at query block
    m0 and key block n0 (``d0 = m0 - n0 + off``) reads band ``clamp((d0 - BD) / BG, 0, NT - 1)``, which
    must equal ``W[h, bucket(clamp(qpos - kpos, 0, RT))]`` written out score by score."""
    from types import SimpleNamespace
    from megafire.attention.fused._function import _band_table
    BM, BN = tile
    H, RT, Tk = 3, 12, 160
    Tq = Tk - off
    ft = torch.randn(H * (RT + 1) + 50)
    st = SimpleNamespace(band=True, tables={}, RT=RT, ft=ft, traced=False)
    bt, bd, nt, bg = _band_table(st, H, Tq, Tk, BM, BN, trans=trans)
    assert bt.shape == ((H, nt, BN, BM) if trans else (H, nt, BM, BN))
    tabr = ft[:H * (RT + 1)].view(H, RT + 1)
    for m0 in range(0, Tq, BM):
        for n0 in range(0, Tk, BN):
            t = min(max(m0 - n0 + off - bd, 0) // bg, nt - 1)
            i = torch.arange(BM)[:, None] + m0 + off      # query positions (the keys' last Tq)
            j = torch.arange(BN)[None, :] + n0
            want = tabr[:, (i - j).clamp(0, RT)]
            got = bt[:, t].transpose(1, 2) if trans else bt[:, t]
            assert torch.equal(got, want), (m0, n0)


def test_onepass_min_n(monkeypatch):
    """``onepass_min_n``: shorter key sequences keep the dq + dkdv kernels, longer ones take the
    one-pass kernel; both equal the reference."""
    from megafire.attention.fused import CONFIGS
    monkeypatch.setitem(CONFIGS, "interp", dict(CONFIGS["interp"], onepass=ONEPASS, onepass_min_n=30))
    seen = _record_launches(monkeypatch, "PGRAD")
    _run("alibi", B=1, Tq=21, Tk=21)
    short = {n for n, _ in seen}
    seen.clear()
    _run("alibi", B=1, Tq=35, Tk=35)
    assert {"_bwd_dq_kernel", "_bwd_dkdv_kernel"} <= short and "_bwd_onepass_kernel" not in short, short
    assert "_bwd_onepass_kernel" in {n for n, _ in seen} and "_bwd_dq_kernel" not in {n for n, _ in seen}, seen


def test_run_mask_min_n(monkeypatch):
    """``run_mask_min_n``: shorter key sequences keep the full mask in one launch per kernel, longer ones
    take the run mask's two (aligned rows with RUN, the others without); both equal the reference."""
    from megafire.attention.fused import CONFIGS
    monkeypatch.setitem(CONFIGS, "interp", dict(CONFIGS["interp"], run_mask=True, run_mask_min_n=30))
    seen = _record_launches(monkeypatch, "RUN")
    _run("kerple_log", B=2, Tq=21, Tk=21, seg=True, cuts=[7])
    short = [r for n, r in seen if n == "_fwd_kernel"]
    seen.clear()
    _run("kerple_log", B=2, Tq=35, Tk=35, seg=True, cuts=[7, 20])
    long = [r for n, r in seen if n == "_fwd_kernel"]
    assert short == [False], short
    assert sorted(long) == [False, True], long


@pytest.mark.parametrize("ku", ["1", "32"])
@pytest.mark.parametrize("name", ["t5", "fire"])
def test_onepass_options(name, ku, monkeypatch):
    """``onepass`` with the other options: light and heavy tile loops (KU), ``segment_bounds``, T5's
    ``defer`` (the heavy loop comes first in a key block's program), a wider key block than query
    tile; FIRE without the log and without the threshold."""
    from megafire.attention.fused import CONFIGS
    monkeypatch.setitem(CONFIGS, "interp", dict(CONFIGS["interp"], onepass=(16, 32, 4, 1), segment_bounds=True,
                                                defer=True))
    monkeypatch.setenv("MEGAFIRE_FUSED_KU", ku)
    kinks = name == "fire"
    _run(name, B=2, Tq=75, Tk=75, seg=True, cuts=[9, 33, 52], kinks=kinks)
    _run(name, B=2, Tq=37, Tk=37, batched_pos=True, kinks=kinks)
    if name == "fire":
        _run(name, B=1, Tq=40, Tk=40, kinks=True, enc_opts=dict(use_log=False, init_L=20.0))
        _run(name, B=1, Tq=17, Tk=17, kinks=True, enc_opts=dict(use_threshold=False))


def test_t5_deferred_boundary_sums(monkeypatch):
    """``defer`` (T5): the dq kernel's heavy tiles keep per-boundary row sums in a register tile
    and add them to the bucket gradients once per program. Same gradients as the reference on
    packed documents (heavy tiles next to each restart), a decode offset and a ragged tail; the
    launches are recorded to show the deferred variant is the one that ran."""
    from megafire.attention.fused import CONFIGS
    monkeypatch.setitem(CONFIGS, "interp", dict(CONFIGS["interp"], defer=True))
    seen = _record_launches(monkeypatch, "DEFER")
    _run("t5", B=2, Tq=75, Tk=75, seg=True, cuts=[9, 33, 52])
    _run("t5", B=1, Tq=6, Tk=35, offset=3)
    _run("t5", B=1, Tq=37, Tk=37)
    assert ("_bwd_dq_kernel", True) in seen and ("_bwd_dq_kernel", False) not in seen, seen


def test_fire_tables_exact():
    """The segment tables reproduce f on a dense grid (incl. kinks outside [0, 1], w1 = 0)."""
    from megafire.attention.fused._fire_tables import fire_tables
    enc = build("fire", 3, 16).double()
    with torch.no_grad():
        enc.mlp[0].weight[0] = 0.0
        enc.mlp[0].bias[0] = 0.3
    w1 = enc.mlp[0].weight.view(-1).float()
    ft, it, _rank = fire_tables(w1, enc.mlp[0].bias.float(), enc.mlp[2].weight.float(), enc.mlp[2].bias.float(), 64)
    H, W = 3, w1.numel()
    NS = W + 1
    A = ft[:H * NS].view(H, NS).double() / 1.4426950408889634
    Dt = ft[H * NS:2 * H * NS].view(H, NS).double() / 1.4426950408889634
    kinks = ft[2 * H * NS + H * W:].double()
    x = torch.linspace(-0.5, 1.5, 4001, dtype=torch.float64)
    seg = torch.searchsorted(kinks, x, right=False)  # number of kinks < x
    got = A[:, seg] * x + Dt[:, seg]
    want = enc.mlp_forward(x).t()
    assert (got - want).abs().max() < 1e-5
    # the bin table brackets every kink: [SEGLO[g], SEGHI[g]) holds every kink in bin g
    seglo, seghi = it[:64].long(), it[64:].long()
    for g in range(64):
        inside = ((kinks >= g / 64) & (kinks <= (g + 1) / 64)).nonzero().view(-1)
        assert all(seglo[g] <= t < seghi[g] for t in inside.tolist())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("packed", [False, True], ids=["one_doc", "packed"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("name", ENCS)
def test_gpu_bf16(name, D, packed):
    """bf16 on the GPU vs the float64 reference: rel err <= 1e-2 for out and every gradient
    (FIRE: every MLP weight, c_raw, L_mult; with kinks crossing tiles). ``packed``: four
    documents per row (positions restart, segment ids; the dead tiles skipped)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    B, T, H, HKV = 2, 777, 8, 2
    enc = None if name == "none" else build(name, H, D, **({"init_L": 128.0} if name == "fire" else {}))
    if name == "fire":
        kinks_inside(enc, 0.05, 0.95)
    enc = enc.to(dev) if enc is not None else None
    q = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, HKV, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, HKV, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    pos, seg = torch.arange(T, device=dev), None
    if packed:
        pos, seg = (t[None].expand(B, T).to(dev) for t in _packed(T, [130, 400, 610]))
    out = fused_bias_attention(q, k, v, enc, pos, pos, segment_ids_q=seg, segment_ids_k=seg)
    do = torch.randn_like(out)
    out.backward(do)
    import copy
    e2 = copy.deepcopy(enc).double() if enc is not None else None
    for p in ([] if e2 is None else e2.parameters()):
        p.grad = None
    qs, ks, vs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(qs, ks, vs, e2, pos, pos, seg_q=seg, seg_k=seg)
    ref.backward(do.double())
    assert _rel(out, ref) < 1e-2 and _rel(q.grad, qs.grad) < 1e-2
    assert _rel(k.grad, ks.grad) < 1e-2 and _rel(v.grad, vs.grad) < 1e-2
    if enc is not None:
        for (n, p), (_, p2) in zip(enc.named_parameters(), e2.named_parameters()):
            if p.requires_grad:
                assert _rel(p.grad, p2.grad) < 1e-2, (n, _rel(p.grad, p2.grad))
    assert math.isfinite(out.float().sum().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128])
def test_t5_band_gpu_bf16(D, monkeypatch):
    """``t5_band`` on the GPU (bf16, the committed launch shapes: 64x64 forward and one-pass at D=64,
    the dq 128x64 / dkdv kernels at D=128): the output and every gradient equal those of the gather
    path to 1e-3 (the same fp32 bias values; the compiler may contract the add differently) and the
    float64 reference to 1e-2, on packed rows (aligned) and on rows whose positions jump (fallback)."""
    from megafire.attention.fused import CONFIGS
    dev = torch.device("cuda")
    B, T, H, HKV = 2, 777, 8, 2
    enc = build("t5", H, D).to(dev)
    with torch.no_grad():
        enc.relative_attention_bias.weight.normal_()
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, h, D, device=dev, dtype=torch.bfloat16) for h in (H, HKV, HKV))
    do = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
    p0, s0 = _packed(T, [130, 400, 610])
    pos = torch.stack([p0, torch.arange(T) + 9 * (torch.arange(T) >= 300)]).to(dev)   # row 1: a jump
    seg = torch.stack([s0, torch.zeros(T, dtype=torch.long)]).to(dev)

    def run(band):
        monkeypatch.setitem(CONFIGS, (D, "t5"), dict(CONFIGS.get((D, "t5"), {}), t5_band=band))
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        enc.zero_grad()
        out = fused_bias_attention(*ins, enc, pos, pos, segment_ids_q=seg, segment_ids_k=seg)
        out.backward(do)
        return [out, *(t.grad for t in ins), enc.relative_attention_bias.weight.grad.clone()]

    off, on = run(False), run(True)
    for a, b in zip(on, off):
        assert _rel(a, b) < 1e-3, _rel(a, b)
    import copy
    e2 = copy.deepcopy(enc).double()
    qs, ks, vs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(qs, ks, vs, e2, pos, pos, seg_q=seg, seg_k=seg)
    ref.backward(do.double())
    for a, b in zip(on, [ref, qs.grad, ks.grad, vs.grad, e2.relative_attention_bias.weight.grad]):
        assert _rel(a, b) < 1e-2, _rel(a, b)


def _gpu_option_on_off(monkeypatch, name, enc, D, pos, seg, options, H=8, HKV=2, fixed=None):
    """bf16 on the GPU with the kernel options ``options`` (names) off, then on, for encoding ``name`` at head
    dim D (``fixed``: options set in both runs): output and every gradient with them on equal the off run's
    to 1e-3 and the float64 reference to 1e-2. ``pos`` / ``seg`` [B, T] (on the GPU) give the rows."""
    from megafire.attention.fused import CONFIGS
    dev = pos.device
    B, T = pos.shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, h, D, device=dev, dtype=torch.bfloat16) for h in (H, HKV, HKV))
    do = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
    params = [] if enc is None else [p for p in enc.parameters() if p.requires_grad]

    def run(on):
        monkeypatch.setitem(CONFIGS, (D, name), dict(CONFIGS.get((D, name), {}), **(fixed or {}),
                                                     **dict.fromkeys(options, on)))
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        for p in params:
            p.grad = None
        out = fused_bias_attention(*ins, enc, pos, pos, segment_ids_q=seg, segment_ids_k=seg)
        out.backward(do)
        return [out, *(t.grad for t in ins), *(p.grad.clone() for p in params)]

    off, on = run(False), run(True)
    for a, b in zip(on, off):
        assert _rel(a, b) < 1e-3, _rel(a, b)
    import copy
    e2 = copy.deepcopy(enc).double() if enc is not None else None
    qs, ks, vs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(qs, ks, vs, e2, pos, pos, seg_q=seg, seg_k=seg)
    ref.backward(do.double())
    refs = [ref, qs.grad, ks.grad, vs.grad] + ([] if e2 is None else [p.grad for p in e2.parameters() if p.requires_grad])
    for a, b in zip(on, refs):
        assert _rel(a, b) < 1e-2, _rel(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ENCS)
def test_run_mask_gpu_bf16(name, monkeypatch):
    """``run_mask`` on the GPU (bf16, D=64, the committed launch shapes, with ``t5_band`` for T5): output and
    every gradient equal the full mask's to 1e-3 (the same scores are kept; the two compiled variants
    may schedule the arithmetic differently) and the float64 reference to 1e-2, on packed rows (the
    aligned launch) and a row whose positions jump (the other launch)."""
    dev = torch.device("cuda")
    T, H, D = 777, 8, 64
    enc = None if name == "none" else build(name, H, D, **({"init_L": 128.0} if name == "fire" else {}))
    if name == "fire":
        kinks_inside(enc, 0.05, 0.95)
    enc = enc.to(dev) if enc is not None else None
    p0, s0 = _packed(T, [130, 400, 610])
    pos = torch.stack([p0, torch.arange(T) + 9 * (torch.arange(T) >= 300)]).to(dev)
    seg = torch.stack([s0, torch.zeros(T, dtype=torch.long)]).to(dev)
    # run_mask_min_n 0: these rows (777 keys) are shorter than where Kerple-log's committed run mask begins
    _gpu_option_on_off(monkeypatch, name, enc, D, pos, seg, ("run_mask", "t5_band"), H=H, fixed={"run_mask_min_n": 0})


def test_fire_bf16_parameters_fp32_activations():
    """DeepSpeed bf16 keeps FIRE's weights in bf16: the table and gradient kernels read them
    without casts and autograd returns bf16 gradients. Against the reference run on the same
    bf16 module (fp32 activations): gradients within bf16 rounding (2e-2 relative)."""
    torch.manual_seed(5)
    enc = kinks_inside(_encoding("fire", 2)).to(torch.bfloat16)
    ref_enc = double_copy(enc)                                       # float64 copy of the bf16 values
    B, T, H, D = 2, 23, 2, 16
    q, k, v = (torch.randn(B, T, H, D, requires_grad=True) for _ in range(3))
    pos = torch.arange(T)
    out = fused_bias_attention(q, k, v, enc, pos, pos)
    do = torch.randn_like(out)
    out.backward(do)
    q2, k2, v2 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference(q2, k2, v2, ref_enc, pos, pos).backward(do.double())
    assert _rel(out, reference(q2, k2, v2, ref_enc, pos, pos)) < 1e-5
    assert _rel(q.grad, q2.grad) < 1e-5
    for (n, p), (_, p2) in zip(enc.named_parameters(), ref_enc.named_parameters()):
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.bfloat16, n
            assert _rel(p.grad, p2.grad) < 2e-2, (n, _rel(p.grad, p2.grad))
