"""flex backend == reference: outputs and gradients (q, k, v and every encoding parameter).

torch's FlexAttention refuses a backward on CPU in its public entry point, but its eager
implementation (dense maths, the same score_mod / mask_mod / captured-tensor gradient rules)
is device-agnostic: the ``cpu_backward`` fixture lifts the guard so that the score_mods'
gradients are tested here. The compiled CUDA path is checked on the GPU machine.

Tolerances: float32 flex vs :func:`reference_attention` (fp32 inside), atol = rtol = 1e-5
(observed ~1e-6); float64 flex vs a float64 dense oracle built from ``encoding.bias``,
atol = rtol = 1e-10.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex

from megafire.attention import allowed_mask, reference_attention
from megafire.attention import flex
from megafire.attention.flex import build_score_mod, flex_attention_fn
from megafire.config import ConfigError
from megafire.positional import build_encoding

ENCODINGS = {
    "nope": {},
    "alibi": {},
    "kerple_log": {},
    "kerple_power": {},
    "t5": {"num_buckets": 8, "max_distance": 6},        # distances beyond max_distance occur below
    "fire": {"width": 3, "init_L": 4.0},               # rows beyond L occur: the normaliser varies
}


@pytest.fixture
def cpu_backward(monkeypatch):
    """Lift torch's 'FlexAttention does not support backward on CPU' guard (and ours)."""
    validate = torch_flex._validate_device

    def lenient(q, k, v):
        if q.device.type != "cpu":
            validate(q, k, v)
    monkeypatch.setattr(torch_flex, "_validate_device", lenient)
    monkeypatch.setattr(flex, "_backward_supported", lambda device_type: True)


def make_encoding(name, dtype=torch.float32, H=4, D=8, **extra):
    torch.manual_seed(1)
    enc = build_encoding(name, num_heads=H, head_dim=D, **{**ENCODINGS.get(name, {}), **extra})
    if name == "fire":
        with torch.no_grad():                         # c != init so |c_raw| and L_mult move
            enc.c_raw.fill_(0.7)
    return (enc.to(dtype) if enc.kind == "bias" else None)


def make_case(case, dtype):
    """(q, k, v, q_pos, k_pos, kwargs) of one masking / position situation."""
    g = torch.Generator().manual_seed(0)
    B, Hq = 2, 4
    if case == "packed_gqa":          # documents packed in a row: positions restart, segment ids
        Tq = Tk = 7
        Hkv = 2
        k_pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4]])
        seg_k = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
        kw = dict(causal=True, segment_ids_q=seg_k, segment_ids_k=seg_k)
    elif case == "decode_offset":     # KV cache: 3 queries at positions 9..11 over 10 keys, MQA
        Tq, Tk, Hkv = 3, 10, 1
        k_pos = torch.arange(Tk) + 2
        kw = dict(causal=True)
    elif case == "decode_orphan":     # one query per row, no causal mask, batched positions and segments;
        Tq, Tk, Hkv = 1, 5, 4         # batch 0's query has a segment no key has: its output is 0
        k_pos = torch.stack([torch.arange(Tk) + 4, torch.arange(Tk)])
        seg_k = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
        kw = dict(causal=False, segment_ids_q=torch.tensor([[9], [0]]), segment_ids_k=seg_k)
    else:
        raise ValueError(case)
    q_pos = k_pos[..., Tk - Tq:]
    q = torch.randn(B, Tq, Hq, 8, generator=g, dtype=dtype)
    k = torch.randn(B, Tk, Hkv, 8, generator=g, dtype=dtype)
    v = torch.randn(B, Tk, Hkv, 8, generator=g, dtype=dtype)
    return q, k, v, q_pos, k_pos, kw


def dense_float64(q, k, v, enc, q_pos, k_pos, *, causal, segment_ids_q=None, segment_ids_k=None):
    """The reference's maths written out in float64 (bias from the module itself)."""
    B, Tq, Hq, D = q.shape
    rep = Hq // k.shape[2]
    kk, vv = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)      # [B, Tk, Hq, D]
    s = torch.einsum("bihd,bjhd->bhij", q, kk) / D ** 0.5
    if enc is not None:
        s = s + enc.bias(q_pos, k_pos).double()
    mask = allowed_mask(Tq, k.shape[1], q.device, causal=causal, segment_ids_q=segment_ids_q,
                        segment_ids_k=segment_ids_k)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", p, vv)


def outputs_and_grads(fn, q, k, v, enc, q_pos, k_pos, kw, seed=2):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if enc is not None:
        enc.zero_grad(set_to_none=True)
    out = fn(q, k, v, enc, q_pos, k_pos, **kw)
    # drawn in float32 whatever out's dtype, so that runs in different dtypes get the same dO
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    out.backward(do)
    params = [] if enc is None else [(n, p) for n, p in enc.named_parameters() if p.requires_grad]
    return {"out": out, "dq": q.grad, "dk": k.grad, "dv": v.grad, **{n: p.grad for n, p in params}}


def assert_same(got, want, tol):
    assert got.keys() == want.keys()
    for name in want:
        if want[name] is None:                        # a parameter the configuration does not use
            assert got[name] is None, name
            continue
        assert got[name] is not None, f"no gradient for {name}"
        torch.testing.assert_close(got[name], want[name], atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", ["packed_gqa", "decode_offset", "decode_orphan"])
@pytest.mark.parametrize("name", list(ENCODINGS))
def test_flex_equals_reference_float32(name, case, cpu_backward):
    enc = make_encoding(name)
    q, k, v, q_pos, k_pos, kw = make_case(case, torch.float32)
    got = outputs_and_grads(flex_attention_fn, q, k, v, enc, q_pos, k_pos, kw)
    want = outputs_and_grads(reference_attention, q, k, v, enc, q_pos, k_pos, kw)
    assert_same(got, want, 1e-5)
    param_grads = [g for n, g in want.items() if n not in ("out", "dq", "dk", "dv")]
    assert not param_grads or max(g.abs().max() for g in param_grads if g is not None) > 0   # not trivially equal
    if case == "decode_orphan":
        assert got["out"][0].abs().max() == 0                     # a row with no allowed key is 0


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_flex_equals_dense_oracle_float64(name, cpu_backward):
    enc = make_encoding(name, torch.float64)
    q, k, v, q_pos, k_pos, kw = make_case("packed_gqa", torch.float64)
    got = outputs_and_grads(flex_attention_fn, q, k, v, enc, q_pos, k_pos, kw)
    want = outputs_and_grads(dense_float64, q, k, v, copy.deepcopy(enc), q_pos, k_pos, kw)
    assert got["out"].dtype == torch.float64
    assert_same(got, want, 1e-10)


@pytest.mark.parametrize("ablation", [dict(use_log=False, learn_L=False), dict(use_threshold=False),
                                      dict(progressive=False)])
def test_flex_fire_ablations(ablation, cpu_backward):
    enc = make_encoding("fire", **ablation)
    q, k, v, q_pos, k_pos, kw = make_case("decode_offset", torch.float32)
    got = outputs_and_grads(flex_attention_fn, q, k, v, enc, q_pos, k_pos, kw)
    want = outputs_and_grads(reference_attention, q, k, v, enc, q_pos, k_pos, kw)
    assert_same(got, want, 1e-5)


def test_flex_keeps_a_low_precision_dtype(cpu_backward):
    enc = make_encoding("kerple_log")
    q, k, v, q_pos, k_pos, kw = make_case("packed_gqa", torch.bfloat16)
    with torch.no_grad():
        got = flex_attention_fn(q, k, v, enc, q_pos, k_pos, **kw)
        want = reference_attention(q, k, v, enc, q_pos, k_pos, **kw)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", [n for n in ENCODINGS if n != "nope"])
def test_each_grad_capture_is_indexed_once_per_score(name):
    """Compiled flex refuses a grad-requiring capture indexed more than once ('Using multiple
    indexing operations on the same tensor that requires gradients'); eager would not notice."""
    enc = make_encoding(name)
    q_pos = torch.stack([torch.arange(5), torch.arange(5) + 3])
    score_mod, captured = build_score_mod(enc, q_pos, q_pos)
    assert all(t.requires_grad for t in captured) and len({id(t) for t in captured}) == len(captured)
    counts = {id(t): 0 for t in captured}

    class CountIndexing(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.__getitem__ and id(args[0]) in counts:
                counts[id(args[0])] += 1
            return func(*args, **(kwargs or {}))
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)     # noqa: E731
    with CountIndexing():
        score_mod(torch.tensor(0.5), i32(1), i32(2), i32(4), i32(1))
    assert set(counts.values()) <= {1}, counts
    # every learnable parameter reaches the score through some capture
    params = [p for p in enc.parameters() if p.requires_grad]
    if params:
        grads = torch.autograd.grad(sum(t.sum() for t in captured), params, allow_unused=True)
        assert all(g is not None for g in grads)


def test_cpu_gradient_is_a_config_error_and_forward_works():
    enc = make_encoding("alibi")
    q, k, v, q_pos, k_pos, kw = make_case("decode_offset", torch.float32)
    with pytest.raises(ConfigError, match=r"attention.backend=flex cannot compute gradients on 'cpu'.*"
                                          r"FlexAttention does not support backward on CPU.*reference or auto"):
        flex_attention_fn(q.requires_grad_(), k, v, enc, q_pos, k_pos, **kw)
    with torch.no_grad():                             # inference on CPU is fine, even with grad-leaf inputs
        got = flex_attention_fn(q, k, v, enc, q_pos, k_pos, **kw)
        torch.testing.assert_close(got, reference_attention(q, k, v, enc, q_pos, k_pos, **kw), atol=1e-5, rtol=1e-5)


def test_block_mask_cache_sees_new_segment_ids():
    enc = make_encoding("alibi")
    q, k, v, q_pos, k_pos, kw = make_case("packed_gqa", torch.float32)
    seg = kw["segment_ids_k"].clone()
    with torch.no_grad():
        flex_attention_fn(q, k, v, enc, q_pos, k_pos, causal=True, segment_ids_q=seg, segment_ids_k=seg)
        seg.fill_(0)                                  # in place: the cached mask must not be reused
        got = flex_attention_fn(q, k, v, enc, q_pos, k_pos, causal=True, segment_ids_q=seg, segment_ids_k=seg)
        want = reference_attention(q, k, v, enc, q_pos, k_pos, causal=True, segment_ids_q=seg, segment_ids_k=seg)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_flex_forward_on_cpu_equals_reference(monkeypatch):
    """The compiled (fused) path, as used on CUDA, forward only (~1 min of C++ compile)."""
    monkeypatch.setattr(flex, "_flex_call", lambda device_type: torch.compile(torch_flex.flex_attention))
    enc = make_encoding("kerple_log", D=16)
    q, k, v, q_pos, k_pos, kw = make_case("packed_gqa", torch.float32)
    q, k, v = (torch.cat([t, t], dim=-1) for t in (q, k, v))                    # D = 16
    with torch.no_grad():
        got = flex_attention_fn(q, k, v, enc, q_pos, k_pos, **kw)
        want = reference_attention(q, k, v, enc, q_pos, k_pos, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the compiled Triton flex path)")
@pytest.mark.parametrize("name", list(ENCODINGS))
def test_compiled_flex_on_cuda_equals_float64_reference(name):
    """Compiled flex (float32) vs the float64 reference: packed documents, GQA, a length that is
    no multiple of the 128 block; relative norm error of the output and every gradient <= 1e-3.
    float32 rather than bf16 because flex, like any kernel that takes ``delta = dO . O`` from the
    rounded output, has bf16 parameter gradients off by ~1e-2 (docs/kernels.md): that would
    hide a wrong score_mod gradient. FIRE's output bias shifts whole rows (softmax ignores it):
    its true gradient is 0, so it is bounded absolutely against the output weight's."""
    torch.manual_seed(0)
    dev, B, T, Hq, Hkv, D = "cuda", 2, 333, 8, 2, 64
    opts = {"init_L": 128.0} if name == "fire" else {}               # rows beyond L: the normaliser varies
    enc = build_encoding(name, num_heads=Hq, head_dim=D, **opts).to(dev)
    enc = enc if enc.kind == "bias" else None
    q = torch.randn(B, T, Hq, D, device=dev)
    k, v = (torch.randn(B, T, Hkv, D, device=dev) for _ in range(2))
    seg = (torch.arange(T, device=dev) >= 200).long().expand(B, T).contiguous()
    pos = torch.where(seg == 0, torch.arange(T, device=dev), torch.arange(T, device=dev) - 200)
    kw = dict(causal=True, segment_ids_q=seg, segment_ids_k=seg)
    got = outputs_and_grads(flex_attention_fn, q, k, v, enc, pos, pos, kw)
    enc64 = None if enc is None else copy.deepcopy(enc).double()
    want = outputs_and_grads(reference_attention, q.double(), k.double(), v.double(), enc64, pos, pos, kw)
    errs = {}
    for key in want:
        if want[key] is None:
            assert got[key] is None, key
            continue
        diff = (got[key].double() - want[key]).norm().item()
        scale = want["mlp.2.weight"].norm().item() if key == "mlp.2.bias" else want[key].norm().item()
        errs[key] = diff / scale
    print(f"flex {name} relative errors vs float64: " + " ".join(f"{k}={e:.1e}" for k, e in errs.items()))
    assert all(e <= 1e-3 for e in errs.values()), f"{name}: relative errors {errs}"
