"""The fused attention as registered torch.library ops: torch.compile traces it into one graph.

CPU (Triton's interpreter, tiny shapes; the opaque custom ops, which the interpreter needs):
* ``torch.library.opcheck`` of the forward op for every encoding: schema, autograd
  registration, the fake (meta) implementation against the real one, AOT dispatch with
  dynamic shapes;
* a function calling ``fused_bias_attention`` compiled with ``fullgraph=True`` (a graph break
  would raise) gives the eager output and every gradient (q, k, v and the encoding's own
  parameters) bit for bit, with segment masks and GQA.

GPU (``-m gpu``): the same for the inline op (``torch.library.triton_op``: inductor launches the
kernels itself), whose generated code must hold the kernels and no call of the op.
"""
from __future__ import annotations

import pytest
import torch

from fused_ref import build

triton = pytest.importorskip("triton")

from megafire.attention.fused import fused_bias_attention  # noqa: E402
from megafire.attention.fused._function import LEARNED, encoding_inputs, position_tables  # noqa: E402

ENCS = ["none", "alibi", "kerple_log", "kerple_power", "t5", "fire"]
B, T, H, HKV, D = 2, 20, 4, 2, 16


def _encoding(name):
    if name == "none":
        return None
    return build(name, H, 16, **({"init_L": 9.0} if name == "fire" else {}))


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).requires_grad_() for shape in ((B, T, H, D), (B, T, HKV, D), (B, T, HKV, D))]


def _expected_writes(name: str, onepass: bool, split: bool = False, diag: bool = False, run: bool = False) -> list:
    """The tensors each launch of one forward + backward writes (the kernels' docstrings);
    ``onepass``: one backward kernel instead of dq + dkdv; ``split``: each of those twice (light,
    then heavy tiles: ``split_heavy``); ``diag``: T5's ``t5_diag`` scratch (heavy tiles only: not in a
    split's light launch); ``run``: each attention kernel launched twice (``run_mask``: the aligned rows,
    then the others), writing the same tensors."""
    learned = name in LEARNED
    fwd = ["LSE", "O"] + (["ORES"] if learned else [])
    sums = (["PART"] if learned else []) + (["ROWC", "ROWX"] if name == "fire" else [])
    scr = ["SCR"] if diag and name == "t5" else []
    table = [["_tile_table_kernel", ["SPC", "SPL", "TA", "TT"]]] if name in ("t5", "fire") else []
    twice = 2 if run else 1
    dq = ([["_bwd_dq_kernel", ["DQ", *sums]]] * twice) * split + [["_bwd_dq_kernel", ["DQ", *sums, *scr]]] * twice
    bwd = ([["_bwd_onepass_kernel", sorted(["DK", "DQA", "DV", *sums, *scr])]] * twice if onepass else
           dq + [["_bwd_dkdv_kernel", ["DK", "DV"]]] * (twice * (1 + split)))
    rows = ([["_fire_prep_kernel", ["FT", "IT", "RANK"]]] if name == "fire" else []) + table + [
        ["_fwd_kernel", fwd]] * twice + [["_bwd_delta_kernel", ["DELTA"]]] + table + bwd
    return rows + ([["_fire_grad_kernel", ["DB1", "DB2", "DW1", "DW2"]]] if name == "fire" else [])


def _launch_flags(name: str, override: dict, n: int = 128) -> tuple:
    """(onepass, split, diag, run) of ``name``'s D=64 launches at ``n`` keys (traced_launches.py's T): the
    committed configuration with the ``MEGAFIRE_FUSED_CONFIGS`` override's "64" keys on top."""
    from megafire.attention.fused._function import committed_config, option_for
    cfg = {**committed_config(64, name), **override.get("64", {})}
    onepass = bool(option_for(cfg, "onepass", n))
    split = bool(cfg.get("split_heavy")) and not onepass and name in ("t5", "fire")
    return onepass, split, bool(cfg.get("t5_diag")), bool(option_for(cfg, "run_mask", n))


@pytest.mark.parametrize("options", ["committed", "prepared", "onepass", "split", "run"])
def test_inductor_sees_exactly_what_each_launch_writes(options):
    """On CPU, for sm_90: every launch of the inline op lowers to TTIR with Python floats typed
    fp64 (as inductor's launches type them; an fp32 loop-carried value turned fp64 fails to
    compile), and inductor's mutation analysis finds exactly the tensors the kernel writes (an
    over-approximation makes the compiled graph clone K, V and the tables, and refuse leaf
    inputs). See tests/fused/traced_launches.py. "committed": FIRE's split backward (``split_heavy``) and
    T5's ``t5_diag`` scratch (written, read back by the same program) included. "prepared": T5
    ``defer``, ``segment_bounds``, ``t5_diag`` and ``t5_band`` (band tables and row flags: read only)
    forced on (all committed for T5 at D=64; the override also covers FIRE) with KU=2,
    for T5 and FIRE. "onepass": the one-pass backward for every
    encoding (committed for none / ALiBi / T5): its dQ atomics, parameter sums and FIRE's row sums are
    all that it writes. "split": ``split_heavy`` for T5 too (two-kernel backward, with ``t5_band``): the
    heavy-tile launches read the light ones' fp32 partials and write only their outputs and sums. "run":
    ``run_mask`` (every encoding; with ``t5_band``): each attention kernel twice, each launch writing what
    one writes."""
    import json
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "traced_launches.py")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEGAFIRE_FUSED_CONFIGS",
                                                            "MEGAFIRE_FUSED_KU")}
    names, override = ENCS, {}
    if options == "prepared":
        override = {"64": {"defer": True, "segment_bounds": True, "t5_diag": True, "t5_band": True}}
        env.update(MEGAFIRE_FUSED_KU="2")
        names = ["t5", "fire"]
    if options == "onepass":
        override = {"64": {"onepass": [64, 64, 4, 1], "onepass_min_n": 0}}
    if options == "split":
        override = {"64": {"split_heavy": True, "onepass": False, "t5_band": True}}
        names = ["t5", "fire"]
    if options == "run":
        override = {"64": {"run_mask": True, "run_mask_min_n": 0, "t5_band": True}}
    if override:
        env.update(MEGAFIRE_FUSED_CONFIGS=json.dumps(override))
    done = subprocess.run([sys.executable, script, *names], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for name in names:
        expected = _expected_writes(name, *_launch_flags(name, override))
        assert found[name] == expected, (name, found[name])


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a CUDA GPU")])
#: the op each device's calls take: the interpreter's kernels cannot be traced into
OPS = {"cpu": "fused_bias_attention_opaque", "cuda": "fused_bias_attention"}


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("name", ENCS)
def test_opcheck(name, device):
    enc = _encoding(name)
    if enc is not None:
        enc = enc.to(device)
    q, k, v = [t.detach().to(device).requires_grad_() for t in _qkv()]
    pos = torch.arange(T, device=device)
    name_, params, aux, eps, use_log, nb, md = encoding_inputs(enc, pos, T, q.device)
    params = [p.detach().requires_grad_() for p in params]
    args = (q, k, v, position_tables(pos, pos, B, T, T), None, None, params, [a.detach() for a in aux], name_, True,
            D ** -0.5, eps, use_log, nb, md, name_ in LEARNED)
    op = getattr(torch.ops.megafire, OPS[device]).default
    # the inline op is traced with static shapes only: its launch configuration depends on the
    # head dim (a dict lookup a symbolic size cannot make); the trainer compiles dynamic=False
    utils = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_static" if device == "cuda" else "test_aot_dispatch_dynamic")
    result = torch.library.opcheck(op, args, test_utils=utils)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("name", ENCS)
def test_fullgraph_compile_equals_eager(name):
    enc = _encoding(name)
    q, k, v = _qkv(1)
    pos = torch.arange(T)
    seg = torch.zeros(B, T, dtype=torch.long)
    seg[0, 13:] = 1                                   # two documents in the first row

    def loss(q, k, v, pos, seg):
        o = fused_bias_attention(q, k, v, enc, pos, pos, segment_ids_q=seg, segment_ids_k=seg)
        return (o * 1.5).sin().sum()                  # ops on both sides of the call, in one graph

    wrt = [q, k, v] + (list(enc.parameters()) if enc is not None else [])
    eager = loss(q, k, v, pos, seg)
    eager_grads = torch.autograd.grad(eager, wrt)
    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(q, k, v, pos, seg)
    compiled_grads = torch.autograd.grad(compiled, wrt)
    assert torch.equal(eager, compiled)
    for i, (a, b) in enumerate(zip(eager_grads, compiled_grads)):
        assert torch.equal(a, b), f"gradient {i} of {name}"
    if name in LEARNED:   # the encoding's parameters did receive gradients through the op
        assert all(g.abs().sum() > 0 for g in eager_grads[3:] if g.numel() > 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["alibi", "kerple_power", "t5", "t5-band", "fire"])   # every kernel branch; ~30 s each
def test_inductor_launches_the_kernels_inline(name, monkeypatch):
    """CUDA, fp32: compiled by inductor, the inline op's kernels are launched from the generated
    code (the op's Python body is gone from the step: no call of the op remains), and the output
    and every gradient equal the eager call's and the opaque op's under the same compile.
    "t5-band": T5 with ``t5_band`` (its row flags and band tables then are ops of the graph)."""
    from torch._inductor.utils import run_and_get_code

    if name == "t5-band":
        from megafire.attention.fused import CONFIGS
        name = "t5"
        monkeypatch.setitem(CONFIGS, (D, "t5"), dict(CONFIGS.get((D, "t5"), {}), t5_band=True))
    enc = _encoding(name)
    enc = enc.cuda() if enc is not None else None
    q, k, v = [t.detach().cuda().requires_grad_() for t in _qkv(2)]
    pos = torch.arange(T, device="cuda")
    seg = torch.zeros(B, T, dtype=torch.long, device="cuda")
    seg[0, 13:] = 1
    wrt = [q, k, v] + (list(enc.parameters()) if enc is not None else [])

    def loss(q, k, v, pos, seg, inline=True):
        o = fused_bias_attention(q, k, v, enc, pos, pos, segment_ids_q=seg, segment_ids_k=seg, inline=inline)
        return (o * 1.5).sin().sum()

    def grads(out):
        return [out.detach()] + list(torch.autograd.grad(out, wrt))

    eager = grads(loss(q, k, v, pos, seg))
    results = {}
    for inline in (True, False):
        torch._dynamo.reset()
        fn = torch.compile(lambda *a, inline=inline: loss(*a, inline=inline), fullgraph=True)
        out, code = run_and_get_code(lambda: grads(fn(q, k, v, pos, seg)))
        results[inline] = out
        source = "\n".join(code)
        if inline:
            assert "_fwd_kernel" in source and "megafire.fused_bias_attention" not in source, source[-3000:]
        else:
            assert "megafire.fused_bias_attention_opaque" in source
    names = ["out", "dq", "dk", "dv"] + ([n for n, _ in enc.named_parameters()] if enc is not None else [])
    for name_, a, b, c in zip(names, eager, results[True], results[False]):
        atol = 1e-6
        if name_ == "mlp.2.bias":
            # FIRE's output bias gets sum_ij dS_ij per head, and every row of dS = P (dP - D) sums
            # to 0: the true gradient is 0, each path returns its own rounding (1.1e-6 seen)
            assert a.abs().max() < 1e-5, a
            atol = 1e-5
        torch.testing.assert_close(b, a, rtol=1e-5, atol=atol, msg=lambda m: f"inline, {name_}: {m}")
        # the opaque op's graph reassociates the parameter-gradient sums (FIRE's c: 1.3e-5 seen)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=atol, msg=lambda m: f"opaque, {name_}: {m}")


@pytest.mark.parametrize("opts", [pytest.param("t5_band", marks=pytest.mark.slow),
                                  pytest.param("run_mask", marks=pytest.mark.slow), "t5_band,run_mask"])
def test_fullgraph_compile_t5_band(opts, monkeypatch):
    """T5 with ``t5_band`` / ``run_mask`` under ``torch.compile(fullgraph=True)``: the rows' alignment flags
    (and first keys) are traced with the call (no cache lookup, no graph break), and loss and every
    gradient equal the eager call's and those with the options off (bit-identical: the band tiles hold
    the gather's values, the run mask keeps the same scores; that these paths run at all is
    test_fused_attention.py's ``test_t5_band`` / ``test_run_mask``)."""
    from megafire.attention.fused import CONFIGS
    import megafire.attention.fused._function as fn
    enc = _encoding("t5")
    with torch.no_grad():
        enc.relative_attention_bias.weight.normal_()
    q, k, v = _qkv(3)
    pos = torch.cat([torch.arange(13), torch.arange(T - 13)])       # positions restart with the second document
    seg = torch.zeros(B, T, dtype=torch.long)
    seg[:, 13:] = 1

    def loss(q, k, v, pos, seg):
        o = fused_bias_attention(q, k, v, enc, pos, pos, segment_ids_q=seg, segment_ids_k=seg)
        return (o * 1.5).sin().sum()

    wrt = [q, k, v, enc.relative_attention_bias.weight]
    res = {}
    for band in (False, True):
        monkeypatch.setitem(CONFIGS, "interp", dict(CONFIGS["interp"], **{o: band for o in opts.split(",")}))
        eager = loss(q, k, v, pos, seg)
        res[band, "eager"] = [eager.detach(), *torch.autograd.grad(eager, wrt)]
        torch._dynamo.reset()
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(q, k, v, pos, seg)
        res[band, "compiled"] = [compiled.detach(), *torch.autograd.grad(compiled, wrt)]
    p32, s32 = pos.to(torch.int32), seg.to(torch.int32)
    assert fn._aligned_rows(p32, p32, s32, s32, T, T).tolist() == [1, 1]        # both rows take the band
    for key, got in res.items():
        assert all(torch.equal(a, b) for a, b in zip(res[False, "eager"], got)), key


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("name", ["fire", "t5"])
def test_block_compiles_whole_with_the_fused_kernels(name, device):
    """A GPT's blocks bound to the fused kernels are traceable (megafire.model.perf compiles each
    as ONE graph, not two halves around an eager call) and the compiled model's loss and every
    gradient equal the eager model's (fp32; inductor's kernels reassociate the norms' sums).
    On CUDA: the compiled Triton kernels and inductor's CUDA code."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megafire.attention.dispatch import fused_attention
    from megafire.config import Config
    from megafire.model import GPT, lm_loss
    from megafire.model.perf import compile_block
    from megafire.parallel import init_parallel

    cfg = Config()
    m = cfg.model
    m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.max_positions = 64, 64, 2, 4, 2, 64
    m.position.name, m.position.options = name, ({"init_L": 8.0} if name == "fire" else {})
    cfg.attention.backend = "reference"
    parallel = init_parallel(tp=1, pp=1, backend="gloo")

    def run(compiled: bool):
        model = GPT.from_config(cfg, parallel, seed=3).to(device)
        for module in model.modules():   # perf.apply at tp = 1: plain F.linear (megatron's layers warn in the trace)
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                module.megafire_direct = True
        for block in model.blocks:
            block.attn._bound = (device, fused_attention)   # what perf.apply binds on CUDA for auto
            if compiled:
                compile_block(block)
                assert block.split_compiled is None     # whole-block compile, no eager attention call
        g = torch.Generator().manual_seed(5)
        x = torch.randint(0, 64, (2, 24), generator=g).to(device)
        seg = torch.zeros(2, 24, dtype=torch.long, device=device)
        seg[1, 10:] = 1
        logits = model(x[:, :-1], torch.arange(23, device=device), seg[:, :-1])
        loss = lm_loss(logits, x[:, 1:]).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    torch._dynamo.reset()
    eager_loss, eager_grads = run(False)
    torch._dynamo.utils.counters.clear()
    comp_loss, comp_grads = run(True)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-6, atol=0)
    for n, g in eager_grads.items():
        torch.testing.assert_close(comp_grads[n], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    enc = [n for n in eager_grads if "position" in n or "relative_attention_bias" in n or "mlp.0" in n]
    assert enc, list(eager_grads)   # the encoding's own parameters are among those compared
