"""Gradient reductions that the tensor-parallel layers do not do by themselves."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def tp_replicated_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters flagged ``megafire_tp_replicated`` (each listed once, even when shared)."""
    return [p for p in model.parameters() if getattr(p, "megafire_tp_replicated", False)]


def allreduce_tp_replicated_grads(model: nn.Module, tp_group) -> None:
    """Sum the gradients of TP-replicated parameters over the tensor-parallel group.

    A parameter that every TP rank holds in full but that only feeds that rank's heads (FIRE's
    MLP hidden layer, c, L) gets the gradient of the local heads' loss terms on each rank:
    ``dL/dp = sum_r dL_r/dp``. Call after backward and before clipping / the optimizer step.
    One flattened all-reduce per dtype.
    """
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return
    grads = [p.grad for p in tp_replicated_params(model) if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = _flatten_dense_tensors(group)
        dist.all_reduce(flat, group=tp_group)
        for g, reduced in zip(group, _unflatten_dense_tensors(flat, group)):
            g.copy_(reduced)


class _AllReduceGrad:
    """Tensor hook: the summed gradient over the TP group (returned, not modified in place)."""

    def __init__(self, group):
        self.group = group

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=self.group)
        return grad


def install_tp_replicated_grad_hooks(model: nn.Module, tp_group) -> int:
    """Make backward itself sum the gradients of TP-replicated parameters over the TP group.

    A hook on the parameter tensor runs when autograd has the parameter's total gradient of
    this backward (all uses summed, shared encodings included) and before it is accumulated
    into ``.grad`` -- and therefore before DeepSpeed's ZeRO hooks reduce-scatter or partition
    it over data parallel, and before clipping. This is the form the trainer uses for every
    ZeRO stage and for pipelines (ZeRO-2/3 free ``.grad`` during backward, so an all-reduce
    after backward, :func:`allreduce_tp_replicated_grads`, cannot work there). Every TP rank
    runs the same backward graph, so the collectives line up. Returns the number of hooked
    parameters; calling it twice on a model is an error (the gradient would be summed twice).
    """
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return 0
    params = tp_replicated_params(model)
    for p in params:
        if getattr(p, "megafire_tp_hooked", False):
            raise RuntimeError("TP-replicated gradient hooks are already installed on this model")
        p.register_hook(_AllReduceGrad(tp_group))
        p.megafire_tp_hooked = True
    return len(params)


def mark_tp_sharded_encoding_params(model: nn.Module, tp_size: int) -> int:
    """Flag per-head encoding parameters as tensor-parallel (``tensor_model_parallel = True``).

    Under TP a bias or rotary encoding holds only its local heads' share of per-head
    parameters (FIRE's output layer, Kerple's r1/r2, T5's table): gradient-norm code must
    count each rank's shard (sum over the TP group), like megatron's sharded weights, and not
    once as if replicated -- otherwise the clipping coefficient differs between TP ranks
    (megafire's ZeRO-0 clipping) or misses shards (DeepSpeed's norm), and replicated weights
    drift apart. Parameters flagged ``megafire_tp_replicated`` and those of absolute encodings
    (full copies with complete gradients) stay replicated. Returns the number flagged.
    """
    from megafire.positional import PositionalEncoding
    if tp_size == 1:
        return 0
    flagged = 0
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, PositionalEncoding) or module.kind not in ("bias", "rotary") or id(module) in seen:
            continue
        seen.add(id(module))
        for p in module.parameters():
            if not getattr(p, "megafire_tp_replicated", False):
                p.tensor_model_parallel = True
                flagged += 1
    return flagged
