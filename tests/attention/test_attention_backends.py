"""reference == literal float64 maths; sdpa == reference; masked positions stay masked."""
from __future__ import annotations

import math

import pytest
import torch
from attention_testlib import FakeRotary, RandomBias

from megafire.attention import allowed_mask, reference_attention, sdpa_attention
from megafire.attention import reference as reference_module


def literal_attention(q, k, v, bias, seg_q, seg_k, causal=True):
    """Loops over (b, h, i): softmax(q.k / sqrt(d) + bias) v in float64, masks as in the docstring."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    out = torch.zeros(B, Tq, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for i in range(Tq):
                s = [(q[b, i, h].double() @ k[b, j, g].double()).item() / math.sqrt(D)
                     + (0.0 if bias is None else bias[b, h, i, j].item()) for j in range(Tk)]
                ok = [(not causal or j <= Tk - Tq + i) and (seg_q is None or seg_q[b, i] == seg_k[b, j])
                      for j in range(Tk)]
                s = torch.tensor([x if o else -math.inf for x, o in zip(s, ok)], dtype=torch.float64)
                p = torch.softmax(s, 0)
                out[b, i, h] = p @ v[b, :, g].double()
    return out


def make(B=2, Tq=6, Tk=6, Hq=4, Hkv=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, Hq, D, generator=g)
    k = torch.randn(B, Tk, Hkv, D, generator=g)
    v = torch.randn(B, Tk, Hkv, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("Tq,Tk,Hkv,segments,batched_pos", [
    (6, 6, 4, False, False), (6, 6, 2, True, False), (3, 7, 1, False, True), (1, 5, 2, True, True),
    (5, 9, 2, True, False)])
def test_reference_equals_literal_float64(Tq, Tk, Hkv, segments, batched_pos):
    torch.manual_seed(0)
    q, k, v = make(Tq=Tq, Tk=Tk, Hkv=Hkv)
    enc = RandomBias(4, 8)
    k_pos = torch.stack([torch.arange(Tk), torch.arange(Tk) + 5]) if batched_pos else torch.arange(Tk)
    q_pos = k_pos[..., Tk - Tq:]
    seg_k = torch.tensor([[0] * (Tk // 2) + [1] * (Tk - Tk // 2), [0] * Tk]) if segments else None
    seg_q = None if seg_k is None else seg_k[:, Tk - Tq:]
    bias = enc.bias(q_pos, k_pos).detach()
    bias = bias.expand(2, *bias.shape[-3:]) if bias.dim() == 3 else bias
    expected = literal_attention(q, k, v, bias, seg_q, seg_k)
    got = reference_attention(q, k, v, enc, q_pos, k_pos, segment_ids_q=seg_q, segment_ids_k=seg_k)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_query_chunks_match_one_chunk(monkeypatch):
    q, k, v = make(Tq=9, Tk=11)
    enc = RandomBias(4, 8)
    seg = torch.tensor([[0] * 4 + [1] * 7, [0] * 11])
    args = (q, k, v, enc, torch.arange(2, 11), torch.arange(11))
    kw = dict(segment_ids_q=seg[:, 2:], segment_ids_k=seg)
    whole = reference_attention(*args, **kw)
    monkeypatch.setattr(reference_module, "QUERY_CHUNK", 2)
    torch.testing.assert_close(reference_attention(*args, **kw), whole)


def test_reference_keeps_dtype_and_backpropagates_into_bias():
    q, k, v = (t.bfloat16().requires_grad_() for t in make())
    enc = RandomBias(4, 8)
    out = reference_attention(q, k, v, enc, torch.arange(6), torch.arange(6))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert enc.table.grad is not None and q.grad is not None


@pytest.mark.parametrize("encoding", [None, FakeRotary(4, 8)])
@pytest.mark.parametrize("Tq,Tk,Hkv,segments", [
    (7, 7, 4, False), (7, 7, 2, False), (7, 7, 1, True), (3, 8, 2, False), (1, 8, 2, False), (4, 9, 2, True)])
def test_sdpa_equals_reference(encoding, Tq, Tk, Hkv, segments):
    q, k, v = make(Tq=Tq, Tk=Tk, Hkv=Hkv, seed=Tq * Tk)
    seg_k = torch.tensor([[0] * 3 + [1] * (Tk - 3), [2] * 5 + [3] * (Tk - 5)]) if segments else None
    seg_q = None if seg_k is None else seg_k[:, Tk - Tq:]
    pos_k = torch.arange(Tk)
    args = (q, k, v, encoding, pos_k[Tk - Tq:], pos_k)
    kw = dict(segment_ids_q=seg_q, segment_ids_k=seg_k)
    torch.testing.assert_close(sdpa_attention(*args, **kw), reference_attention(*args, **kw), atol=1e-5, rtol=1e-5)


def test_sdpa_refuses_a_bias_encoding():
    q, k, v = make()
    with pytest.raises(ValueError, match="bias"):
        sdpa_attention(q, k, v, RandomBias(4, 8), torch.arange(6), torch.arange(6))


@pytest.mark.parametrize("backend", [reference_attention, sdpa_attention])
def test_masked_positions_stay_masked(backend):
    """Changing a future token or another document's token leaves earlier/other outputs unchanged."""
    enc = RandomBias(4, 8) if backend is reference_attention else None
    q, k, v = make(B=1, Tq=10, Tk=10)
    seg = torch.tensor([[0] * 4 + [1] * 6])
    pos = torch.cat([torch.arange(4), torch.arange(6)])
    run = lambda k, v: backend(q, k, v, enc, pos, pos, segment_ids_q=seg, segment_ids_k=seg)
    base = run(k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, 7] += 5.0
    v2[:, 7] += 5.0                                                       # a future token of document 1
    out = run(k2, v2)
    torch.testing.assert_close(out[:, :7], base[:, :7])
    assert not torch.allclose(out[:, 7:], base[:, 7:])
    k3, v3 = k.clone(), v.clone()
    k3[:, 1] += 5.0
    v3[:, 1] += 5.0                                                       # a token of document 0
    out = run(k3, v3)
    torch.testing.assert_close(out[:, 4:], base[:, 4:])                  # document 1 does not see it
    assert not torch.allclose(out[:, 1:4], base[:, 1:4])


def test_allowed_mask_is_end_aligned():
    m = allowed_mask(2, 5, "cpu")
    assert m.tolist() == [[True, True, True, True, False], [True] * 5]
    assert allowed_mask(3, 3, "cpu", causal=False) is None
    with pytest.raises(ValueError, match="both"):
        allowed_mask(3, 3, "cpu", segment_ids_q=torch.zeros(1, 3))
