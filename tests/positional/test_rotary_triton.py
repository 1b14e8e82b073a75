"""Fused rotary (one Triton launch for q and k) == RoPE's torch path, outputs and gradients.

CPU: Triton's interpreter (TRITON_INTERPRET=1, set per test by the fixture below;
``rotary_triton`` reloads the kernels when the flag changes) on tiny shapes: every scaling, partial
rotary, GQA, [T] / [1, T] / [B, T] positions with offsets, q_pos != k_pos (decoding),
strided inputs (the model's fused-QKV views), fp32 and fp16. The torch path (itself tested
against transformers' apply_rotary_pos_emb in test_positional_rope.py) is the reference.

Tolerances: fp32 1e-6 (cos/sin of numpy vs torch differ in the last bit); fp16 one unit in
the last place. bf16 on CPU is checked to one unit in the last place only: the interpreter
truncates fp32 -> bf16 where the GPU rounds to nearest even (the GPU test checks bf16).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from megafire.config import ConfigError, load_config  # noqa: E402
from megafire.positional import build_encoding  # noqa: E402
from megafire.positional import rotary_triton  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter(request, monkeypatch):
    """CPU tests run the kernel in Triton's interpreter, GPU tests compiled (the kernels module
    is reloaded when the flag changes), on a machine with or without a GPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "0" if request.node.get_closest_marker("gpu") else "1")


ORIG = 16  # the "training length" of dynamic / yarn
SCALINGS = {
    "none": {},
    "linear": {"scaling": "linear", "factor": 4.0},
    "ntk": {"scaling": "ntk", "factor": 4.0},
    "dynamic": {"scaling": "dynamic", "factor": 4.0, "original_max_positions": ORIG},
    "yarn": {"scaling": "yarn", "factor": 8.0, "original_max_positions": ORIG},
}
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=2.0 ** -10, atol=2.0 ** -14),
       torch.bfloat16: dict(rtol=2.0 ** -7, atol=2.0 ** -12)}


def pair(heads=3, head_dim=16, **options):
    """(fused, torch) RoPE modules with the same options."""
    make = lambda: build_encoding("rope", num_heads=heads, head_dim=head_dim, **options)  # noqa: E731
    return make().set_fused_rotary("true"), make().set_fused_rotary("false")


def compare(fused, ref, q, k, q_pos, k_pos, tol=None):
    """Outputs and gradients (wrt q and k, random upstream gradients) of both modules agree."""
    tol = tol or TOL[q.dtype]
    gen = torch.Generator().manual_seed(1)
    results = []
    for enc in (fused, ref):
        qi, ki = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        q_out, k_out = enc.rotate(qi, ki, q_pos, k_pos)
        gen.manual_seed(1)
        dq_out = torch.randn(q_out.shape, generator=gen).to(device=q.device, dtype=q.dtype)
        dk_out = torch.randn(k_out.shape, generator=gen).to(device=k.device, dtype=k.dtype)
        torch.autograd.backward((q_out, k_out), (dq_out, dk_out))
        results.append((q_out, k_out, qi.grad, ki.grad))
    for name, a, b in zip(("q_out", "k_out", "dq", "dk"), *results):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")
    return results


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_every_scaling_gqa_batched_positions(scaling, dtype):
    fused, ref = pair(heads=3, **SCALINGS[scaling])
    B, T = 2, 11   # T and B * T are not multiples of the token block
    q, k = randn(B, T, 3, 16, dtype=dtype), randn(B, T, 1, 16, dtype=dtype, seed=1)   # GQA: 3 query heads, 1 kv
    # packed documents in row 0, an offset beyond the original length in row 1 (dynamic rescales)
    pos = torch.stack([torch.cat([torch.arange(4), torch.arange(T - 4)]), torch.arange(T) + 3 * ORIG])
    compare(fused, ref, q, k, pos, pos)


@pytest.mark.parametrize("head_dim,partial", [(16, 0.5), (32, 0.25), (24, 0.5), (24, 1.0), (20, 0.6)],
                         ids=["16x0.5", "32x0.25", "24x0.5", "24", "20x0.6"])
def test_partial_rotary_and_odd_dims(head_dim, partial):
    # half widths 4, 4, 6, 12, 6 (not powers of two) and pass-through tails 8, 24, 12, 0, 8
    fused, ref = pair(heads=2, head_dim=head_dim, scaling="yarn", factor=4.0, original_max_positions=ORIG,
                      partial_rotary_factor=partial)
    q, k = randn(2, 5, 2, head_dim), randn(2, 5, 2, head_dim, seed=1)
    pos = torch.arange(5) + 40
    (q_out, k_out, dq, _), _ = compare(fused, ref, q, k, pos, pos)
    r = fused.rotary_dim
    assert torch.equal(q_out[..., r:], q[..., r:]) and not torch.allclose(q_out[..., :r], q[..., :r])


def test_decoding_offsets_and_mixed_position_shapes():
    fused, ref = pair(heads=4, scaling="dynamic", factor=2.0, original_max_positions=ORIG)
    B, Tk = 3, 9
    k = randn(B, Tk, 2, 16, seed=2)
    # one new query per sequence at its own position ([B, 1]) against shared key positions [Tk]
    q = randn(B, 1, 4, 16, seed=3)
    compare(fused, ref, q, k, torch.tensor([[Tk - 1], [Tk + 20], [Tk + 40]]), torch.arange(Tk) + 30)
    # [1, T] broadcast over the batch, int32 positions, Tq != Tk
    q = randn(B, 4, 4, 16, seed=4)
    compare(fused, ref, q, k, (torch.arange(4) + Tk - 4).view(1, 4).int(), torch.arange(Tk).int())


def test_strided_views_of_a_fused_qkv_projection():
    """As the model's Attention.project: q and k are strided views of one [B, T, G, R + 2, D] tensor."""
    fused, ref = pair(heads=4)
    B, T, G, R, D = 2, 7, 2, 2, 16
    qkv = randn(B, T, G, R + 2, D)
    grads = []
    for enc in (fused, ref):
        leaf = qkv.clone().requires_grad_()
        q, k = leaf[:, :, :, :R].reshape(B, T, G * R, D), leaf[:, :, :, R]
        assert not k.is_contiguous()
        q_out, k_out = enc.rotate(q, k, torch.arange(T), torch.arange(T))
        (q_out.square().sum() + (k_out * torch.linspace(-1, 1, D)).sum()).backward()
        grads.append((q_out, k_out, leaf.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_bf16_within_one_unit_in_the_last_place():
    fused, ref = pair(heads=2, scaling="linear", factor=2.0)
    q, k = randn(2, 6, 2, 16, dtype=torch.bfloat16), randn(2, 6, 2, 16, dtype=torch.bfloat16, seed=1)
    (q_out, *_), _ = compare(fused, ref, q, k, torch.arange(6), torch.arange(6) + 5)
    assert q_out.dtype == torch.bfloat16


def test_backward_is_the_inverse_rotation():
    """dL/dq of L = <rotate(q), g> is g rotated by -theta: rotating it forward gives g back."""
    fused, _ = pair(heads=2, scaling="yarn", factor=4.0, original_max_positions=ORIG)
    q = randn(1, 5, 2, 16).requires_grad_()
    g = randn(1, 5, 2, 16, seed=5)
    pos = torch.arange(5) * 3
    q_out, _ = fused.rotate(q, q.detach(), pos, pos)
    (q_out * g).sum().backward()
    a = fused.attention_scaling
    back, _ = fused.rotate(q.grad, q.grad, pos, pos)   # R(theta) a * (a R(-theta) g) = a^2 g
    torch.testing.assert_close(back, a * a * g, rtol=1e-5, atol=1e-5)


def test_module_dispatch(monkeypatch):
    calls = []
    real = rotary_triton.fused_rotary
    monkeypatch.setattr(rotary_triton, "fused_rotary", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, pos = randn(1, 3, 2, 16), torch.arange(3)
    for mode, expect in (("true", 1), ("false", 0), ("auto", 0)):   # auto: the kernel for CUDA tensors only
        calls.clear()
        enc = build_encoding("rope", num_heads=2, head_dim=16).set_fused_rotary(mode)
        enc.rotate(q, q, pos, pos)
        assert len(calls) == expect, mode
    with pytest.raises(ConfigError, match="auto.*true.*false"):
        enc.set_fused_rotary("yes")


def test_true_on_cpu_without_interpreter_is_a_config_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    enc = build_encoding("rope", num_heads=2, head_dim=16).set_fused_rotary("true")
    q, pos = randn(1, 3, 2, 16), torch.arange(3)
    with pytest.raises(ConfigError, match=r"model\.position\.fused_rotary.*cpu.*auto.*true.*false"):
        enc.rotate(q, q, pos, pos)
    enc.set_fused_rotary("auto")
    torch.testing.assert_close(enc.rotate(q, q, pos, pos)[0], enc.set_fused_rotary("false").rotate(q, q, pos, pos)[0])


def test_config_key():
    assert load_config().model.position.fused_rotary == "auto"
    for raw, value in (("true", "true"), ("false", "false"), ("auto", "auto")):   # YAML booleans become the choice
        assert load_config(overrides=[f"--model.position.fused_rotary={raw}"]).model.position.fused_rotary == value
    with pytest.raises(ConfigError, match=r"model\.position\.fused_rotary.*allowed: auto, true, false"):
        load_config(overrides=["--model.position.fused_rotary=always"])
    with pytest.raises(ConfigError, match=r"model\.position\.fused_rotary.*allowed: auto, true, false"):
        load_config(overrides=["--model.position.fused_rotary=1"])


def test_build_encodings_passes_the_choice_on():
    from megafire.model.layers import build_encodings
    parallel = types.SimpleNamespace(tp_rank=0, tp_size=1)
    cfg = load_config(overrides=["--model.position.fused_rotary=false", "--model.num_layers=3"]).model
    _, layers = build_encodings(cfg, parallel)
    assert [enc.fused_rotary for enc in layers] == ["false"] * 3
    cfg = load_config(overrides=["--model.position.name=alibi", "--model.position.fused_rotary=true"]).model
    with pytest.raises(ConfigError, match=r"model\.position\.fused_rotary.*rotary encoding.*alibi"):
        build_encodings(cfg, parallel)


def test_megafire_imports_and_rotates_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from megafire.config import ConfigError\n"
            "from megafire.positional import build_encoding\n"
            "enc = build_encoding('rope', num_heads=2, head_dim=8)\n"
            "q, p = torch.randn(1, 3, 2, 8), torch.arange(3)\n"
            "enc.rotate(q, q, p, p)\n"
            "enc.set_fused_rotary('true')\n"
            "try:\n    enc.rotate(q, q, p, p)\n"
            "except ConfigError as e:\n    print('refused:', e)\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: model.position.fused_rotary='true' needs Triton" in out.stdout, out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run of the microbenchmark")
def test_microbenchmark_smoke_run(capsys):
    from megafire.bench.rotary import main
    assert main(["--tokens", "16", "--batch", "2", "--heads", "2", "--kv-heads", "1", "--head-dim", "8",
                 "--dtype", "fp16", "--scaling", "yarn"]) == 0
    out = capsys.readouterr().out
    assert "torch (reference)" in out and "triton (block_t=" in out and "failed" not in out


def test_bench_train_rope_variants(monkeypatch, capsys, tmp_path):
    """--rope-variants times the rope arm with fused_rotary=false and =true; other arms run once."""
    from megafire.bench import train as bench_train
    runs = []

    def fake_bench(config, overrides, steps, warmup, position=None, profile_dir=None):
        fused = "--model.position.fused_rotary=true" in overrides
        runs.append((position, [o for o in overrides if "fused_rotary" in o]))
        tps = 300.0 if fused else 200.0 if position else 100.0
        return {"encoding": position or "fire", "tokens_per_s": tps,
                "by_seq_len": {64: {"tokens_per_s": tps, "step_time_s": 1.0, "mfu": None, "num_steps": 1}}}

    monkeypatch.setattr(bench_train, "bench_config", fake_bench)
    argv = ["--config", str(Path(__file__).parents[2] / "configs" / "demo-cpu.yaml"), "--steps", "3", "--warmup", "1"]
    assert bench_train.main(argv + ["--rope-variants"]) == 0
    assert runs == [(None, []), ("rope", ["--model.position.fused_rotary=false"]),
                    ("rope", ["--model.position.fused_rotary=true"])]
    out = capsys.readouterr().out
    assert "rope (torch)" in out and "rope (fused)" in out and "fused rotary / torch rotary: 1.500" in out
    assert "fire / rope (fused): 0.333" in out
    runs.clear()
    assert bench_train.main(argv) == 0   # without the flag: one peer run, as before
    assert runs == [(None, []), ("rope", [])] and "fire / rope: 0.500" in capsys.readouterr().out
    runs.clear()
    out_json = tmp_path / "b.json"
    assert bench_train.main(argv + ["--peer", "alibi,rope", "--out", str(out_json)]) == 0   # several peers
    assert [r[0] for r in runs] == [None, "alibi", "rope"]
    result = json.loads(out_json.read_text())
    assert result["ratio_vs_peer_alibi"] == 0.5 and result["ratio_vs_peer_rope"] == 0.5
    runs.clear()
    seen = []
    monkeypatch.setattr(bench_train, "bench_config", lambda c, o, *a, position=None, **k: (
        seen.append((position, [x for x in o if "backend" in x])), fake_bench(c, o, *a, position=position, **k))[1])
    assert bench_train.main(argv + ["--peer", "rope,rope@sdpa", "--out", str(out_json)]) == 0   # NAME@BACKEND
    assert seen == [(None, []), ("rope", []), ("rope", ["--attention.backend=sdpa"])]
    assert "fire / rope@sdpa: 0.500" in capsys.readouterr().out
    assert "ratio_vs_peer_rope_sdpa" in json.loads(out_json.read_text())
    from megafire.config import ConfigError
    for bad in ("rope@magic", "compact@sdpa"):
        with pytest.raises(ConfigError, match=f"--peer {bad}: the part after '@' is an attention.backend"):
            bench_train.main(argv + ["--peer", bad])


def test_bench_ratio_at_matched_lengths():
    """A peer that also ran other lengths (the compact peer over a curriculum) is compared at the
    main arm's lengths only, not through its median over every length."""
    from megafire.bench.train import ratio_at_matched_lengths

    def arm(**tps):
        by = {int(n[1:]): {"tokens_per_s": v} for n, v in tps.items()}
        import statistics
        return {"tokens_per_s": statistics.median(by[n]["tokens_per_s"] for n in by), "by_seq_len": by}
    main, peer = arm(L512=300.0), arm(L512=400.0, L1024=380.0, L2048=200.0)
    assert ratio_at_matched_lengths(main, peer) == 0.75           # not 300 / 380
    assert ratio_at_matched_lengths(arm(L512=300.0, L1024=190.0), peer) == 0.625   # median of 0.75 and 0.5
    assert ratio_at_matched_lengths(arm(L64=100.0), peer) == 100.0 / 380.0        # nothing shared: the medians


# --- GPU ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("scaling,head_dim,partial", [("none", 64, 1.0), ("yarn", 64, 1.0), ("dynamic", 128, 0.5),
                                                      ("linear", 80, 1.0)])
def test_cuda_matches_torch_path(dtype, scaling, head_dim, partial):
    options = dict(SCALINGS[scaling])
    if "original_max_positions" in options:
        options["original_max_positions"] = 1024
    fused, ref = (enc.cuda() for enc in pair(heads=12, head_dim=head_dim, partial_rotary_factor=partial, **options))
    B, T = 2, 777
    q = randn(B, T, 12, head_dim, dtype=dtype).cuda()
    k = randn(B, T, 4, head_dim, dtype=dtype, seed=1).cuda()
    # long positions (angles up to ~1e5 rad: the range reduction matters) and packed documents
    pos = torch.stack([torch.arange(T) + 100_000, torch.cat([torch.arange(300), torch.arange(T - 300)])]).cuda()
    assert fused._use_fused(q, k)
    # fp32: libdevice cos/sin are torch's; FMA contraction costs at most a few fp32 ulps
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else TOL[dtype]
    (q_out, k_out, dq, dk), (q_ref, k_ref, dq_ref, dk_ref) = compare(fused, ref, q, k, pos, pos, tol=tol)
    if dtype != torch.float32:   # round to nearest on the GPU: almost every element is bit-equal
        for a, b in ((q_out, q_ref), (k_out, k_ref), (dq, dq_ref), (dk, dk_ref)):
            assert (a != b).float().mean().item() < 0.01
