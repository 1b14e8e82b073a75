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
