"""The ``perf`` switches (megafire.model.perf) change how the step is computed, not what.

Each optimization on equals it off: the loss trace of a short real run (fp32 on CPU, where
torch.compile generates C++ kernels) with every switch on against every switch off, for a
rotary encoding (SDPA traced inside the compiled block) and a bias encoding (the attention
call runs eagerly between two compiled graphs). Bound 1e-6 relative: fp32, same kernels up
to the compiler's reassociation of the norms; measured 0 (rope) and 6e-8 (fire).
"""
import pytest
import torch

import _train_util
from megafire.config import ConfigError, PerfConfig
from megafire.model import perf
from megafire.train.engine import ALIGN_ELEMENTS, aligned_order
from megafire.train.loop import train

ON = {"compile": "true", "fused_loss": "true", "direct_linear": True, "inline_kernels": True,
      "foreach_grad_checks": True}
OFF = {"compile": "false", "fused_loss": "false", "direct_linear": False, "inline_kernels": False,
       "foreach_grad_checks": False, "cuda_graphs": "false"}
ONE_STAGE = {"curriculum": {"stages": [{"seq_len": 32, "tokens": 100_000}]}, "train": {"max_steps": 4}}


def _trace(tmp_path, name, position, perf_over, extra=None):
    base = dict(_train_util.TINY)
    base["model"] = {**base["model"], "position": position}
    cfg_dict = _train_util._merge(_train_util._merge(base, ONE_STAGE), {"run": {"dir": str(tmp_path / name)},
                                                                       "perf": perf_over, **(extra or {})})
    from megafire.config import load_config
    cfg = load_config(None, cfg_dict)
    losses, flags = [], []
    train(cfg, callbacks=[lambda trainer, r: (losses.append(r["loss"]), flags.append(trainer.perf))],
          save_final=False)
    return losses, flags[0]


@pytest.mark.parametrize("position", [{"name": "rope", "options": {}}, {"name": "fire", "options": {"init_L": 16}}],
                         ids=["rope", "fire"])
def test_perf_on_equals_off(tmp_path, position):
    off, flags_off = _trace(tmp_path, "off", position, OFF)
    on, flags_on = _trace(tmp_path, "on", position, ON)
    assert not (flags_off.compile or flags_off.fused_loss or flags_off.direct_linear)
    assert flags_on.compile and flags_on.fused_loss and flags_on.direct_linear
    assert len(on) == len(off) == 4
    worst = max(abs(a - b) / abs(b) for a, b in zip(on, off))
    assert worst <= 1e-6, (on, off)
    assert off[-1] < off[0]          # it trained: a trace that does not move would compare equal trivially


def test_graph_gradients_are_copied_once_per_step():
    """perf.own_graph_gradients: a gradient that AccumulateGrad stole from the backward (with CUDA
    graphs: the graph's output memory) is replaced by a copy of the same values; the next
    micro-step accumulates into that copy in place; after the optimizer sets it to None the
    next one is copied again. Without the hook the stolen tensor is the .grad (the control)."""
    from torch import nn
    x = torch.randn(4, 3)

    def backward_ptr(lin):
        ptrs = []
        handle = lin.weight.register_hook(lambda g: ptrs.append(g.data_ptr()))   # no reference kept
        lin(x).square().sum().backward()
        handle.remove()
        return ptrs[0]

    torch.manual_seed(0)
    plain = nn.Linear(3, 2)
    assert backward_ptr(plain) == plain.weight.grad.data_ptr()        # stolen: the backward's own tensor
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    perf.own_graph_gradients(lin)
    assert backward_ptr(lin) != lin.weight.grad.data_ptr()
    torch.testing.assert_close(lin.weight.grad, plain.weight.grad, rtol=0, atol=0)
    first = lin.weight.grad
    backward_ptr(lin)
    assert lin.weight.grad is first                                  # accumulated in place, not copied
    torch.testing.assert_close(first, 2 * plain.weight.grad)
    import weakref
    dropped = weakref.ref(first)
    del first
    lin.weight.grad = None                                           # the optimizer's zero_grad
    assert dropped() is None                                         # the hook keeps no gradient alive
    assert backward_ptr(lin) != lin.weight.grad.data_ptr()


def test_auto_resolves_off_on_cpu_and_refuses_impossible_choices():
    flags = perf.resolve(PerfConfig(), device_type="cpu", tp=1, sequence_parallel=False, zero_stage=1)
    assert not flags.compile and not flags.fused_loss and flags.direct_linear and not flags.inline_kernels
    assert "not on CUDA" in flags.why
    cuda = perf.resolve(PerfConfig(), device_type="cuda", tp=1, sequence_parallel=False, zero_stage=1)
    assert cuda.compile and cuda.fused_loss and cuda.inline_kernels
    assert not perf.resolve(PerfConfig(inline_kernels=False), device_type="cuda", tp=1, sequence_parallel=False,
                            zero_stage=1).inline_kernels
    assert cuda.cuda_graphs                                          # auto: on in the validated regime
    assert not perf.resolve(PerfConfig(cuda_graphs="false"), device_type="cuda", tp=1, sequence_parallel=False,
                            zero_stage=1).cuda_graphs
    for kw, why in ((dict(zero_stage=2), "ZeRO-2 moves gradients"), (dict(zero_stage=1, pp=2), "pp > 1"),
                    (dict(zero_stage=1, tp=2), "tp > 1"),
                    (dict(zero_stage=1, activation_checkpointing=True), "activation checkpointing")):
        kw = {"tp": 1, "sequence_parallel": False, **kw}
        off = perf.resolve(PerfConfig(), device_type="cuda", **kw)
        assert not off.cuda_graphs and why in off.why.split("cuda_graphs off: ")[1]
        with pytest.raises(ConfigError, match=f"perf.cuda_graphs=true is not supported here \\(.*{why}"):
            perf.resolve(PerfConfig(cuda_graphs="true"), device_type="cuda", **kw)
    no_compile = perf.resolve(PerfConfig(compile="false"), device_type="cuda", tp=1, sequence_parallel=False,
                              zero_stage=1)
    assert not no_compile.cuda_graphs and "cuda_graphs off: compile is off" in no_compile.why
    opaque = perf.resolve(PerfConfig(inline_kernels=False), device_type="cuda", tp=1, sequence_parallel=False,
                          zero_stage=1)
    assert not opaque.cuda_graphs and "inline_kernels is off" in opaque.why
    assert not flags.cuda_graphs                                     # CPU
    z3 = perf.resolve(PerfConfig(), device_type="cuda", tp=1, sequence_parallel=False, zero_stage=3)
    assert not z3.compile and "ZeRO-3" in z3.why
    tp2 = perf.resolve(PerfConfig(), device_type="cuda", tp=2, sequence_parallel=False, zero_stage=1)
    assert not tp2.compile and not tp2.fused_loss and not tp2.direct_linear
    with pytest.raises(ConfigError, match="perf.fused_loss=true needs parallel.tp=1"):
        perf.resolve(PerfConfig(fused_loss="true"), device_type="cuda", tp=2, sequence_parallel=False, zero_stage=1)
    with pytest.raises(ConfigError, match="perf.compile=true does not work with parallel.zero_stage=3"):
        perf.resolve(PerfConfig(compile="true"), device_type="cuda", tp=1, sequence_parallel=False, zero_stage=3)
    assert not z3.direct_linear         # ZeRO-3 gathers a weight in its own layer's forward hook


@pytest.mark.parametrize("inline", [True, False])
def test_apply_turns_the_autograd_cache_off_only_for_inline_kernels(inline):
    """``perf.apply`` with compiled blocks and the inline kernels switches AOTAutograd's cache off
    (it pickles the compiled backward; that segfaulted with the inline op's Triton kernels in it);
    with the opaque op the cache stays as it was."""
    import torch._functorch.config as aot_config
    from megafire.model import GPT
    from megafire.parallel import init_parallel

    from megafire.config import Config
    c = Config()
    m = c.model
    m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.max_positions = 64, 32, 1, 2, 2, 64
    gpt = GPT.from_config(c, init_parallel(tp=1, pp=1, backend="gloo"), seed=0)
    with aot_config.patch(enable_autograd_cache=True):   # restored on exit, whatever apply set
        perf.apply(gpt, perf.PerfFlags(compile=True, inline_kernels=inline), "cpu")
        assert aot_config.enable_autograd_cache is (not inline)


def test_zero3_with_partitioned_weights_trains_as_zero1(tmp_path):
    """ZeRO-3 with the weight matrices partitioned (persistence threshold 100 elements: the tiny
    model's matrices are really split, its norms and FIRE's scalars stay whole): the perf switches
    resolve to what works there and the loss trace equals ZeRO-1's with every switch on."""
    position = {"name": "fire", "options": {"init_L": 16}}
    z1, _ = _trace(tmp_path, "z1", position, ON, {"parallel": {"zero_stage": 1}})
    base = dict(_train_util.TINY)
    base["model"] = {**base["model"], "position": position}
    from megafire.config import load_config
    cfg = load_config(None, _train_util._merge(_train_util._merge(base, ONE_STAGE), {
        "run": {"dir": str(tmp_path / "z3")}, "perf": {"direct_linear": True}, "parallel": {"zero_stage": 3}}))
    losses = []
    train(cfg, ds_config_override={"zero_optimization": {"stage3_param_persistence_threshold": 100}},
          callbacks=[lambda trainer, r: losses.append(r["loss"])], save_final=False)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, z1)) <= 1e-5, (losses, z1)


def test_zero_flat_buffers_keep_weights_aligned(tmp_path):
    """ZeRO-1 bf16 flattens each param group; with FIRE's odd-sized parameters (c, L, a bias
    of `heads` entries) placed last, every weight of 16-byte-multiple size starts on a
    16-byte boundary (compiled kernels load 16 bytes at a time: "misaligned address" else)."""
    sizes = [torch.empty(n) for n in (12, 768, 1, 64)]
    assert [p.numel() for p in aligned_order(sizes)] == [768, 64, 12, 1]
    cfg = _train_util.tiny_config(tmp_path / "z1", {"train": {"max_steps": 1, "precision": "bf16"},
                                                    "parallel": {"zero_stage": 1}})
    seen = []
    train(cfg, callbacks=[lambda trainer, r: seen.append(
        [(n, p.data_ptr(), p.numel()) for n, p in trainer.engine.module.named_parameters()])], save_final=False)
    params = seen[0]
    assert any(numel % ALIGN_ELEMENTS for _, _, numel in params)      # the model has odd-sized parameters
    misaligned = [n for n, ptr, numel in params if numel % ALIGN_ELEMENTS == 0 and ptr % 16]
    assert not misaligned, misaligned


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("position", [{"name": "rope", "options": {}}, {"name": "fire", "options": {"init_L": 16}}],
                         ids=["rope", "fire"])
def test_perf_on_equals_off_bf16_gpu(tmp_path, monkeypatch, position):
    """bf16 on one GPU (compiled blocks, SDPA / the fused kernels, compiled cross entropy): the
    loss traces agree within 2e-2 relative over 6 steps (bf16 rounding, reassociated norms).
    RoPE under ``auto`` runs the fused kernels (packed documents): equal, within the same bound,
    to ``attention.backend=sdpa`` (SDPA with the boolean document mask)."""
    from megafire.attention import dispatch
    fused_calls = []
    real = dispatch.fused_attention
    monkeypatch.setattr(dispatch, "fused_attention", lambda *a, **kw: (fused_calls.append(1), real(*a, **kw))[1])
    gpu = {"attention": {"backend": "auto"}, "model": {"hidden_size": 128, "num_heads": 2, "vocab_size": 256},
           "train": {"precision": "bf16", "max_steps": 6}, "parallel": {"zero_stage": 1}}
    off, _ = _trace(tmp_path, "off", position, OFF, gpu)
    on, flags = _trace(tmp_path, "on", position, {"compile": "auto", "fused_loss": "auto", "direct_linear": True,
                                                  "cuda_graphs": "false"}, gpu)
    assert flags.compile and flags.fused_loss and flags.inline_kernels
    worst = max(abs(a - b) / abs(b) for a, b in zip(on, off))
    assert worst <= 2e-2, (on, off)
    if position["name"] == "rope":
        assert fused_calls, "auto did not route RoPE's packed documents to the fused kernels"
        sdpa, _ = _trace(tmp_path, "sdpa", position, {"compile": "auto", "fused_loss": "auto", "direct_linear": True,
                                                      "cuda_graphs": "false"},
                         {**gpu, "attention": {"backend": "sdpa"}})
        worst = max(abs(a - b) / abs(b) for a, b in zip(on, sdpa))
        assert worst <= 2e-2, (on, sdpa)
    graphs, flags = _trace(tmp_path, "graphs", position, {"compile": "auto", "fused_loss": "auto", "direct_linear": True,
                                                            "cuda_graphs": "true"}, gpu)
    assert flags.cuda_graphs       # two micro-steps per step: accumulation into gradients made by the graphs
    worst = max(abs(a - b) / abs(b) for a, b in zip(graphs, on))
    assert worst <= 5e-3, (graphs, on)   # the same kernels replayed (FIRE's dq atomics reorder sums)
    if position["name"] == "fire":   # the inline kernels against the opaque op, both compiled
        opaque, flags = _trace(tmp_path, "opaque", position, {**ON, "inline_kernels": False}, gpu)
        assert flags.compile and not flags.inline_kernels and not flags.cuda_graphs
        worst = max(abs(a - b) / abs(b) for a, b in zip(on, opaque))
        assert worst <= 2e-2, (on, opaque)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_across_stages_and_resume_gpu(tmp_path):
    """CUDA graphs (FIRE, bf16, ZeRO-1, two micro-steps per step) over a two-stage curriculum
    (T=16 then 32: new shapes are recorded mid-run) equal the run without graphs, and a run
    killed after step 3 and resumed from its step-2 checkpoint equals the uninterrupted one
    (loss traces within 5e-3 relative: FIRE's dq atomics make bf16 runs not bit-exact)."""
    from megafire.train.metrics import read_metrics
    gpu = {"attention": {"backend": "auto"}, "model": {"hidden_size": 128, "num_heads": 2, "vocab_size": 256},
           "train": {"precision": "bf16", "checkpoint_every_steps": 2}, "parallel": {"zero_stage": 1}}

    def trace(name):
        return [(r["step"], r["seq_len"], r["loss"]) for r in read_metrics(tmp_path / name)]

    def run(name, perf_over):
        flags = []
        train(_train_util.tiny_config(tmp_path / name, _train_util._merge(gpu, {"perf": perf_over})),
              callbacks=[lambda trainer, r: flags.append(trainer.perf)])
        return trace(name), flags[0]

    graphs, flags = run("graphs", {})
    assert flags.cuda_graphs and [t[1] for t in graphs] == [16, 16, 32, 32, 32, 32]
    plain, flags = run("plain", {"cuda_graphs": "false"})
    assert not flags.cuda_graphs

    def close(a, b):
        assert [t[:2] for t in a] == [t[:2] for t in b]
        worst = max(abs(x[2] - y[2]) / abs(y[2]) for x, y in zip(a, b))
        assert worst <= 5e-3, (a, b)
    close(graphs, plain)
    with pytest.raises(_train_util.Crash):
        train(_train_util.tiny_config(tmp_path / "resumed", gpu), callbacks=[_train_util.crash_after(3)])
    resumed = _train_util.tiny_config(tmp_path / "resumed", _train_util._merge(gpu, {"train": {"resume": True}}))
    train(resumed)
    close(trace("resumed"), graphs)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_foreach_grad_checks_equal_deepspeeds(monkeypatch, precision):
    """ZeRO-1 (DeepSpeed 0.19.8, one process): the multi-tensor overflow test and gradient norm
    (megafire.parallel.ds_compat.foreach_grad_checks) give DeepSpeed's own answers on the same
    reduced gradients: finite, then with a NaN, then with an inf in one gradient; the norm to
    1e-6 relative (both accumulate in fp64), its masking of a non-finite norm included."""
    import deepspeed
    from torch import nn

    from megafire.parallel import destroy_parallel, init_parallel
    from megafire.parallel.ds_compat import foreach_grad_checks
    from megafire.train.engine import DeepSpeedMPU, _skip_shm_build
    monkeypatch.setenv("LOCAL_RANK", "0")
    ctx = init_parallel(tp=1, pp=1, backend="gloo")
    _skip_shm_build()
    try:
        _compare_grad_checks(ctx, precision, deepspeed, nn, foreach_grad_checks, DeepSpeedMPU)
    finally:
        destroy_parallel()


def _compare_grad_checks(ctx, precision, deepspeed, nn, foreach_grad_checks, DeepSpeedMPU):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 3, bias=False))
    ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}, "bf16": {"enabled": precision == "bf16"},
          "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds,
                                           mpu=DeepSpeedMPU(ctx), dist_init_required=False)
    x = torch.randn(2, 8, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    engine.backward(engine(x).float().pow(2).sum())
    opt = engine.optimizer
    grads, params = opt.averaged_gradients[0], opt.params_in_partition[0]
    assert len(grads) >= 3 and all(g is not None for g in grads)

    def answers():
        return bool(opt.has_overflow_partitioned_grads_serial()), float(opt.get_grad_norm_direct(grads, params))

    theirs = [answers()]
    for bad in (float("nan"), float("inf")):
        saved = grads[2].clone()
        grads[2].view(-1)[3] = bad
        theirs.append(answers())
        grads[2].copy_(saved)
    assert foreach_grad_checks(opt) and opt.megafire_foreach_checks
    ours = [answers()]
    for bad in (float("nan"), float("inf")):
        saved = grads[2].clone()
        grads[2].view(-1)[3] = bad
        ours.append(answers())
        grads[2].copy_(saved)
    assert [o for o, _ in theirs] == [o for o, _ in ours] == [False, True, True]
    for (_, a), (_, b) in zip(ours, theirs):
        assert a == pytest.approx(b, rel=1e-6), (ours, theirs)
    assert theirs[0][1] > 0


#: the GPU loss-trace tests' model (D=64) and perf switches (compiled, graphs off)
GPU_TINY = {"model": {"hidden_size": 128, "num_heads": 2, "vocab_size": 256},
            "train": {"precision": "bf16", "max_steps": 6}, "parallel": {"zero_stage": 1}}
GPU_PERF = {"compile": "auto", "fused_loss": "auto", "direct_linear": True, "cuda_graphs": "false"}


#: each kernel optimization committed for T5 / FIRE at D=64 (docs/benchmarks.md, 2026-12-05), off
KERNEL_OFF = {"t5": {"t5_diag": False, "t5_band": False, "run_mask": False},
              "fire": {"split_heavy": False, "rcp_ex2": False, "dq": [64, 64, 4, 2], "ku": 1},
              "kerple_log": {"rcp_ex2": False, "run_mask": False}}
#: the committed run's overrides where its rows are too short for an option (Kerple-log's run mask from 1024 keys)
KERNEL_ON = {"kerple_log": {"run_mask_min_n": 0}}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["t5", "fire", "kerple_log"])
def test_kernel_options_off_equals_on_bf16_gpu(tmp_path, name):
    """The fused kernels' optimizations (``attention.fused_kernels``, their off switch in the config)
    change how, not what: bf16 on one GPU, D=64, the loss trace with T5's ``t5_diag``, ``t5_band`` and
    ``run_mask`` / FIRE's split backward, ``rcp_ex2`` and KU=2 / Kerple-log's ``rcp_ex2`` and ``run_mask`` (on
    at these short rows) off equals the committed one within 2e-2 relative over 6 steps (bf16 rounding; the
    sums run in another order)."""
    from megafire.attention import kernel_options
    position = {"name": name, "options": {"init_L": 16} if name == "fire" else {}}
    on_attn = {"backend": "fused", "fused_kernels": {64: KERNEL_ON.get(name, {})}}
    try:
        on, _ = _trace(tmp_path, "on", position, GPU_PERF, {**GPU_TINY, "attention": on_attn})
    finally:
        kernel_options.set_run_overrides({})
    off, _ = _trace(tmp_path, "off", position, GPU_PERF,
                    {**GPU_TINY, "attention": {"backend": "fused", "fused_kernels": {64: KERNEL_OFF[name]}}})
    try:
        assert kernel_options.run_overrides(64) == kernel_options.check_overrides(
            {64: KERNEL_OFF[name]}, "test")["64"]                    # the off run's model set them
    finally:
        kernel_options.set_run_overrides({})
    worst = max(abs(a - b) / abs(b) for a, b in zip(on, off))
    assert len(on) == len(off) == 6 and worst <= 2e-2, (on, off)
    assert on[-1] < on[0]
