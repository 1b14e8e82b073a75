"""Device-agnostic tensor-parallel collectives megatron-core only offers for CUDA (or for [seq, batch, ...] layouts)."""
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


# --- sequence parallelism: activations [B, T, hidden] sharded along T (dim 1) over the TP group ---

def _all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """[B, T / n, ...] -> [B, T, ...], the ranks' shards concatenated along dim 1 in rank order."""
    size = dist.get_world_size(group)
    shard = x.movedim(1, 0).contiguous()                                   # [T / n, B, ...]
    out = shard.new_empty((shard.shape[0] * size, *shard.shape[1:]))
    dist.all_gather_into_tensor(out, shard, group=group)
    return out.movedim(0, 1)


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    """[B, T, ...] on every rank -> this rank's [B, T / n, ...] slice of the sum over the group."""
    size = dist.get_world_size(group)
    full = x.movedim(1, 0).contiguous()                                     # [T, B, ...]
    out = full.new_empty((full.shape[0] // size, *full.shape[1:]))
    dist.reduce_scatter_tensor(out, full, group=group)
    return out.movedim(0, 1)


def _seq_slice(x: torch.Tensor, group) -> torch.Tensor:
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    chunk = x.shape[1] // n
    return x[:, rank * chunk:(rank + 1) * chunk].contiguous()


def _check_divisible(x: torch.Tensor, group) -> None:
    if x.shape[1] % dist.get_world_size(group):
        raise ValueError(f"sequence parallelism: sequence length {x.shape[1]} is not divisible by the "
                         f"tensor-parallel size {dist.get_world_size(group)}")


class _GatherSeq(torch.autograd.Function):
    """forward: all-gather along the sequence; backward: reduce-scatter (every rank's use of the
    full sequence contributes to each shard's gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ToSeqShard(torch.autograd.Function):
    """forward: this rank's sequence shard of the sum of the ranks' partial outputs (``reduce``)
    or of a replicated tensor; backward: all-gather the shards' gradients (a partial sum fed
    every shard; a replicated input must get the whole sequence's gradient on every rank)."""

    @staticmethod
    def forward(ctx, x, group, reduce):
        ctx.group = group
        _check_divisible(x, group)
        return _reduce_scatter_seq(x, group) if reduce else _seq_slice(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None, None


def gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Sequence shard [B, T / tp, ...] -> full [B, T, ...] on every rank (backward: reduce-scatter)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _GatherSeq.apply(x, group)


def reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Partial sums [B, T, ...] -> this rank's shard [B, T / tp, ...] of their sum (backward: all-gather)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _ToSeqShard.apply(x, group, True)


def scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Replicated [B, T, ...] -> this rank's shard [B, T / tp, ...] (backward: all-gather)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _ToSeqShard.apply(x, group, False)
