"""Device-agnostic tensor-parallel collectives megatron-core only offers for CUDA."""
from __future__ import annotations

import torch
import torch.distributed as dist


class _GatherLastDim(torch.autograd.Function):
    """forward: all-gather along the last dim (rank order); backward: keep this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.size = group, x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rank = dist.get_rank(ctx.group)
        return grad[..., rank * ctx.size:(rank + 1) * ctx.size].contiguous(), None


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """[..., n] on each of the group's ranks -> [..., n * size] everywhere (CPU and CUDA)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _GatherLastDim.apply(x, group)
