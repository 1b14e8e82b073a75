"""Speed switches of the training step (``perf`` config section): what each changes and where.

None of them changes the function computed, only how:

* ``direct_linear`` (tp = 1, no sequence parallelism, ZeRO 0-2): ``column_parallel`` / ``row_parallel``
  call ``F.linear(x, W, b)``. At tp = 1 megatron's layers compute exactly ``x W^T + b``
  through their own autograd Function (copy / reduce regions that are identities, an
  async-all-reduce code path); the plain call is the same product without that host work,
  and it is what ``torch.compile`` traces best.
* ``compile``: each :class:`~megafire.model.block.Block` is compiled (regional compilation:
  the blocks share their code objects, so one compile serves every layer of the same shapes).
  With SDPA or the fused Triton kernels (registered custom ops with their autograd formula)
  the whole block is one graph, forward and backward: the norms, projections, RoPE rotation,
  the encoding's bias prologue (FIRE's denominators, the parameters' casts), SwiGLU and
  residual adds become a few fused kernels per block, and the parameter-gradient algebra after
  the backward kernels joins the backward graph. The eager backends (reference, flex) run
  between the block's two compiled halves (norm + QKV, then output projection + residual +
  norm + SwiGLU + residual). Shapes are static (``dynamic=False``): a length curriculum
  recompiles once per stage.
* ``inline_kernels`` (CUDA): the fused attention is a ``torch.library.triton_op``: in a compiled
  block inductor traces into it and launches the Triton kernels from its generated code, so the
  op's Python body (launch arguments, tile tables, FIRE's kink tables; ~1.4 ms of host time per
  layer and micro-step at 125M) never runs in the step. Off: an opaque custom op in the graph.
* ``fused_loss`` (tp = 1): ``lm_loss`` computes ``logsumexp(z) - z[y]`` from the bf16 logits in
  one compiled reduction; backward ``softmax(z) - onehot(y)`` is one more. Megatron's
  vocab-parallel cross entropy instead makes fp32 copies of the whole ``[tokens, vocab]``
  logits and keeps the fp32 softmax for backward (4 bytes x tokens x vocab).

* ``cuda_graphs`` (``auto``: on with ``compile`` and ``inline_kernels`` on CUDA, tp = 1, pp = 1,
  ZeRO 0-1, no activation checkpointing): each compiled block is captured into CUDA graphs
  (inductor's cudagraph trees) and replayed: one launch per graph instead of the generated
  code's Python launching each kernel. The trainer marks each micro-step's start
  (``torch.compiler.cudagraph_mark_step_begin``) so gradient accumulation starts a new replay,
  and the parameters' gradients are copied out of the graphs' memory once per optimizer step
  (:func:`own_graph_gradients`).

* ``foreach_grad_checks`` (ZeRO 1-2; applied by ``megafire.train.engine``, see
  ``megafire.parallel.ds_compat.foreach_grad_checks``): the step's inf/NaN test and gradient norm
  as one multi-tensor norm each instead of DeepSpeed's per-gradient loops.

With ``compile`` and ``inline_kernels`` together, ``apply`` turns AOTAutograd's cache off: it pickles
the compiled backward, which segfaulted with the inline op's kernels in it.

``resolve(perf, ...)`` turns ``auto`` into on/off with the reason; ``apply(gpt, flags)``
switches a built model. Both are called by the trainer before DeepSpeed wraps the model.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megafire.config import ConfigError


@dataclass(frozen=True)
class PerfFlags:
    compile: bool = False
    fused_loss: bool = False
    direct_linear: bool = False
    inline_kernels: bool = False
    cuda_graphs: bool = False
    why: str = ""                 # why an ``auto`` switch resolved off, for the run log

    def describe(self) -> str:
        on = [k for k in ("compile", "fused_loss", "direct_linear", "inline_kernels", "cuda_graphs")
              if getattr(self, k)]
        return f"perf: {', '.join(on) or 'no optimization'} on" + (f" ({self.why})" if self.why else "")


def resolve(perf, *, device_type: str, tp: int, sequence_parallel: bool, zero_stage: int, pp: int = 1,
            activation_checkpointing: bool = False) -> PerfFlags:
    """``perf`` (a PerfConfig) -> concrete flags for this run; impossible ``true`` choices raise."""
    reasons = []
    blockers = []
    if device_type != "cuda":
        blockers.append("not on CUDA")
    if tp > 1 or sequence_parallel:
        blockers.append("tp > 1")
    if zero_stage >= 3:
        blockers.append("ZeRO-3 gathers parameters in module hooks")

    def pick(name: str, value: str, needs_tp1: bool) -> bool:
        if value == "true":
            if needs_tp1 and (tp > 1 or sequence_parallel):
                raise ConfigError(f"perf.{name}=true needs parallel.tp=1 (vocab-parallel logits at tp > 1 use "
                                  f"megatron's cross entropy); allowed here: auto, false")
            if name == "compile" and zero_stage >= 3:
                raise ConfigError("perf.compile=true does not work with parallel.zero_stage=3: ZeRO-3 gathers each "
                                  "layer's parameters in module hooks, which a compiled block would trace with the "
                                  "empty partitions; allowed here: auto, false")
            return True
        if value == "false":
            return False
        if blockers:
            reasons.append(f"{name} off: {', '.join(blockers)}")
            return False
        return True

    compiled = pick("compile", perf.compile, False)
    inline = bool(perf.inline_kernels) and device_type == "cuda"
    graphs = _cuda_graphs(perf.cuda_graphs, compiled, inline, device_type, tp, sequence_parallel, zero_stage, pp,
                          activation_checkpointing, reasons)
    return PerfFlags(compile=compiled,
                     fused_loss=pick("fused_loss", perf.fused_loss, True),
                     # ZeRO-3 gathers weights in module hooks: keep megatron's layer call there (the
                     # plain call was seen to work in one process; not relied on across ranks)
                     direct_linear=bool(perf.direct_linear) and tp == 1 and not sequence_parallel and zero_stage < 3,
                     # the kernels need a GPU (the interpreter's cannot be traced into)
                     inline_kernels=inline,
                     cuda_graphs=graphs,
                     why="; ".join(reasons))


def _cuda_graphs(value: str, compiled: bool, inline: bool, device_type: str, tp: int, sequence_parallel: bool,
                 zero_stage: int, pp: int, activation_checkpointing: bool, reasons: list) -> bool:
    """perf.cuda_graphs -> on / off. On where it was validated: compiled blocks on CUDA with the
    inline kernels, tp = 1, one pipeline stage, ZeRO 0-1 (gradients stay in ``.grad`` until the
    step). Not there: the opaque fused op (``inline_kernels=false``) keeps tensors cached across
    calls in its Python body, which a replay would not refresh; ZeRO-2's gradient hooks move
    ``.grad`` into DeepSpeed's buffers, which the copy-out of :func:`own_graph_gradients` would
    undo; the pipeline schedule has no micro-step mark; activation checkpointing re-runs the
    blocks' forward inside the backward, and TP's collectives inside captured graphs: not tested."""
    blockers = [why for bad, why in ((device_type != "cuda", "not on CUDA"), (not compiled, "compile is off"),
                                     (not inline, "inline_kernels is off"),
                                     (tp > 1 or sequence_parallel, "tp > 1"), (pp > 1, "pp > 1"),
                                     (zero_stage >= 2, f"ZeRO-{zero_stage} moves gradients in hooks"),
                                     (activation_checkpointing, "activation checkpointing"))
                if bad]
    if value == "false":
        return False
    if value == "true" and blockers:
        raise ConfigError(f"perf.cuda_graphs=true is not supported here ({'; '.join(blockers)}); it needs "
                          f"perf.compile and perf.inline_kernels on CUDA, parallel.tp=1, parallel.pp=1, "
                          f"parallel.zero_stage <= 1 and no parallel.activation_checkpointing; "
                          f"allowed here: auto, false")
    if blockers:
        reasons.append(f"cuda_graphs off: {', '.join(blockers)}")
        return False
    return True


def apply(gpt: nn.Module, flags: PerfFlags, device_type: str) -> nn.Module:
    """Switch a built GPT (and the blocks it shares with a pipeline) to ``flags`` for a run on
    ``device_type``; returns it."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from .attention import Attention
    from .block import Block
    for module in gpt.modules():
        if isinstance(module, Attention):
            module.bind(device_type)
            module.fused_inline = flags.inline_kernels
        elif isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            module.megafire_direct = flags.direct_linear
    gpt.fused_loss = flags.fused_loss
    if flags.compile and flags.inline_kernels:
        # AOTAutograd's cache pickles each compiled graph on its first backward; with the Triton
        # kernels of a triton_op in that graph the pickle segfaulted one GPU test run (torch
        # 2.11; pytorch/pytorch#177442 is the same crash with an external-kernel op, its
        # workaround is this switch). Inductor's own FX-graph cache still serves a re-run.
        torch._functorch.config.enable_autograd_cache = False
    if flags.compile:   # after binding: a block's choice depends on its attention's backend
        for module in gpt.modules():
            if isinstance(module, Block):
                compile_block(module, cuda_graphs=flags.cuda_graphs)
    if flags.cuda_graphs:
        own_graph_gradients(gpt)
    return gpt


def own_graph_gradients(module: nn.Module) -> None:
    """Make every parameter's ``.grad`` a tensor of its own, not a CUDA graph's output.

    A parameter whose ``.grad`` is None takes the backward graph's output tensor itself
    (AccumulateGrad steals it); with CUDA graphs that tensor lives in the graph's memory pool
    and the next micro-step's replay overwrites it before gradient accumulation adds to it
    (torch raises "accessing tensor output of CUDAGraphs that has been overwritten"). After
    each accumulation a hook copies a ``.grad`` it has not made itself (once per parameter per
    optimizer step, when the optimizer has set the gradients to None); later micro-steps add
    into that copy in place."""
    def own(p: torch.Tensor) -> None:
        mine = getattr(p, "_megafire_own_grad", None)
        if p.grad is not None and (mine is None or p.grad is not mine()):
            p.grad = p.grad.clone()
            # a weak reference: once the optimizer drops the gradient, its memory goes with it
            p._megafire_own_grad = weakref.ref(p.grad)
    for p in module.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(own)


def compile_block(block, cuda_graphs: bool = False) -> None:
    """Compile one Block for training: whole (one graph forward, one backward) when its attention
    is traceable (SDPA, fused); otherwise its two halves around the eager attention call, compiled
    explicitly (letting dynamo break the graph at the call nests a resumed frame per call level,
    five compiled regions per block, each with its guards and runtime wrappers)."""
    mode = "reduce-overhead" if cuda_graphs else None
    if block.attn.traceable:
        block.compile(dynamic=False, mode=mode)
    else:
        block.split_compiled = (torch.compile(block.pre_attention, dynamic=False, mode=mode),
                                torch.compile(block.post_attention, dynamic=False, mode=mode))


def direct(layer: nn.Module) -> bool:
    """True when ``layer`` (a megatron parallel linear) should run as a plain F.linear."""
    return getattr(layer, "megafire_direct", False)


def linear(layer: nn.Module, x: torch.Tensor, weight=None) -> torch.Tensor:
    """``x W^T + b`` with the layer's (or the given, tied) weight."""
    return F.linear(x, layer.weight if weight is None else weight, layer.bias)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [N, V] (any float dtype), labels [N] in [0, V) -> fp32 per-token loss [N]."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


_compiled_ce = None


def fused_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``logsumexp_v(z) - z[y]`` per token in fp32 from logits [..., V] and labels [...] (>= 0).

    Compiled on first use: the fp32 upcast, the max, the exp-sum and the gather fuse into
    one pass over the logits; backward reads them once more. Eager ``F.cross_entropy`` on
    CPU (no compiler needed there; same formula).
    """
    global _compiled_ce
    shape = labels.shape
    flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    if not logits.is_cuda:
        return _cross_entropy(flat, flat_labels).view(shape)
    if _compiled_ce is None:
        _compiled_ce = torch.compile(_cross_entropy, dynamic=False)
    return _compiled_ce(flat, flat_labels).view(shape)
