"""Pipeline parallelism: a ``deepspeed.pipe.PipelineModule`` cut from ``GPT.stages()``.

Every rank first builds the whole GPT (same seed, megatron's CPU initialization), so the
initial weights are those of the single-process model whatever the layout; the pipeline
then keeps this stage's layers. The layers are thin wrappers that pass one tuple of plain
tensors between stages::

    (input_ids, positions, segment_ids) -> _EmbeddingPipe -> (h, positions, segment_ids)
        -> [_AbsolutePositionPipe] -> _BlockPipe x num_layers -> _NormPipe -> _LogitsPipe -> logits

and the loss is ``megafire.model.lm_loss(logits, labels)`` on the last stage.

Tied embeddings: the vocab-parallel embedding is a ``TiedLayerSpec`` (key ``"embed"``)
on the first stage and, again, as the output projection on the last; DeepSpeed keeps the
two copies equal (broadcast at start, gradients all-reduced over the first and last stages
of each (tp, dp) coordinate). Shared encodings (T5, FIRE-S: one instance used by every
block) are tied the same way when their blocks fall on several stages: each stage's blocks
hold the same instance (every rank built the whole GPT), and their gradients are summed over
the pipeline group together with DeepSpeed's tied weights (``TiedLayerSpec`` cannot express
it: DeepSpeed builds one module per tie key and stage, and the blocks differ); copies on
stages after the first are flagged ``ds_pipe_replicated`` so the gradient norm counts them once.

Checkpoints of a pipeline are DeepSpeed's per-layer files ``layer_XX-model_YY-model_states.pt``;
:func:`layer_prefixes` names the GPT sub-module each layer index holds (the universal
format uses it to rebuild the GPT's state dict).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

TIED_EMBED = "embed"


class _EmbeddingPipe(nn.Module):
    """First stage: token embedding (vocab parallel). On the last stage (tied embeddings), the
    same module computes the logits with the embedding matrix, through ``logits``."""

    def __init__(self, word: nn.Module, output: Optional[nn.Module] = None):
        super().__init__()
        self.inner = word
        self._output = [output]          # weightless ColumnParallelLinear; a list: not a sub-module

    def forward(self, inputs):
        input_ids, positions, segment_ids = inputs
        return self.inner(input_ids), positions, segment_ids

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._output[0](hidden, weight=self.inner.weight)[0]


def _tied_logits(module: _EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    return module.logits(hidden)


class _AbsolutePositionPipe(nn.Module):
    """Learned / sinusoidal absolute encodings, added after the token embedding."""

    def __init__(self, encoding: nn.Module):
        super().__init__()
        self.inner = encoding

    def forward(self, inputs):
        x, positions, segment_ids = inputs
        return self.inner.embed(x, positions), positions, segment_ids


class _BlockPipe(nn.Module):
    """One transformer block; recomputed in backward with activation checkpointing."""

    def __init__(self, block: nn.Module, document_mask: bool, activation_checkpointing: bool):
        super().__init__()
        self.inner = block
        self.document_mask, self.activation_checkpointing = document_mask, activation_checkpointing

    def forward(self, inputs):
        x, positions, segment_ids = inputs
        seg = segment_ids if self.document_mask else None
        if self.activation_checkpointing and self.training:
            x = checkpoint(self.inner, x, positions, seg, use_reentrant=False)
        else:
            x = self.inner(x, positions, seg)
        return x, positions, segment_ids


class _NormPipe(nn.Module):
    """The final RMSNorm; drops positions and segment ids (the logits need neither)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.inner = norm

    def forward(self, inputs):
        return self.inner(inputs[0])


class _HeadPipe(nn.Module):
    """Untied output projection (column parallel): vocab-parallel logits."""

    def __init__(self, output: nn.Module):
        super().__init__()
        self.inner = output

    def forward(self, hidden):
        return self.inner(hidden)[0]


def _layer_plan(gpt) -> list[tuple[str, str]]:
    """(kind, GPT sub-module prefix) per pipeline layer, in order."""
    plan = [("embed", "embedding.word")]
    if gpt.embedding.encoding is not None:
        plan.append(("abs", "embedding.encoding"))
    plan += [("block", f"blocks.{i}") for i in range(len(gpt.blocks))]
    plan.append(("norm", "head.norm"))
    plan.append(("tied_logits", "embedding.word") if gpt.head.tied else ("head", "head.output"))
    return plan


def layer_prefixes(gpt) -> list[str]:
    """The GPT sub-module held by each pipeline layer index (tied layers repeat their prefix)."""
    return [prefix for _, prefix in _layer_plan(gpt)]


def _shared_encoding(gpt):
    """The one encoding instance shared by every block (T5, FIRE-S), or None."""
    encodings = {id(b.attn.encoding): b.attn.encoding for b in gpt.blocks if b.attn.encoding is not None}
    if len(encodings) == 1 and len(gpt.blocks) > 1:
        enc = next(iter(encodings.values()))
        if any(True for _ in enc.parameters()):
            return enc
    return None


def _pipeline_class():
    from deepspeed.pipe import PipelineModule

    class _Pipeline(PipelineModule):
        """PipelineModule that also sums a shared encoding's gradients over the pipeline stages."""

        def set_shared_encoding(self, encoding, ctx) -> None:
            self._shared = []
            if encoding is None or ctx.pp_size == 1:
                return
            mine = {id(p) for p in self.parameters()}
            self._shared = [p for p in encoding.parameters() if id(p) in mine]
            for p in self._shared:
                p.ds_pipe_replicated = ctx.pp_rank != 0
            self._shared_group = ctx.pp_group

        def get_tied_weights_and_groups(self):
            return super().get_tied_weights_and_groups() + [(p, self._shared_group) for p in self._shared]

    return _Pipeline


def build_pipeline(gpt, ctx, *, activation_checkpointing: bool = False, dynamic_shape: bool = True):
    """``deepspeed.pipe.PipelineModule`` over ``gpt`` for the layout of ``ctx`` (tp x dp x pp).

    The topology is DeepSpeed's ``pipe x data x model`` with the model (TP) axis fastest:
    the same rank order as megatron's parallel_state, which is asserted.
    """
    from deepspeed.pipe import LayerSpec, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from megafire.model import lm_loss

    from .ds_compat import init_deepspeed_comm
    init_deepspeed_comm(ctx.backend)

    _Pipeline = _pipeline_class()
    topo = PipeModelDataParallelTopology(num_pp=ctx.pp_size, num_mp=ctx.tp_size, num_dp=ctx.dp_size)
    doc_mask = gpt.attention_config.document_mask
    shared = _shared_encoding(gpt)
    specs = []
    for kind, prefix in _layer_plan(gpt):
        module = gpt.get_submodule(prefix)
        if kind == "embed":
            specs.append(TiedLayerSpec(TIED_EMBED, _EmbeddingPipe, module, gpt.head.output,
                                       tied_weight_attr=["inner.weight"]) if gpt.head.tied
                         else LayerSpec(_EmbeddingPipe, module))
        elif kind == "abs":
            specs.append(LayerSpec(_AbsolutePositionPipe, module))
        elif kind == "block":
            specs.append(LayerSpec(_BlockPipe, module, doc_mask, activation_checkpointing))
        elif kind == "norm":
            specs.append(LayerSpec(_NormPipe, module))
        elif kind == "tied_logits":
            specs.append(TiedLayerSpec(TIED_EMBED, _EmbeddingPipe, module, gpt.head.output,
                                       forward_fn=_tied_logits, tied_weight_attr=["inner.weight"]))
        else:
            specs.append(LayerSpec(_HeadPipe, module))
    pipe = _Pipeline(layers=specs, topology=topo,
                     loss_fn=lambda logits, labels: lm_loss(logits, labels, fused=gpt.fused_loss),
                     partition_method="type:_BlockPipe", dynamic_shape=dynamic_shape)
    pipe.set_shared_encoding(shared, ctx)
    grid = pipe._grid
    got = (grid.get_stage_id(), grid.get_data_parallel_rank(), grid.get_slice_parallel_rank())
    if got != (ctx.pp_rank, ctx.dp_rank, ctx.tp_rank):
        raise RuntimeError(f"DeepSpeed's pipeline grid puts this rank at (pp, dp, tp) = {got} but megatron's "
                           f"parallel_state at {(ctx.pp_rank, ctx.dp_rank, ctx.tp_rank)}")
    return pipe
