"""Process groups and the ParallelContext handed to model construction.

Groups are created once, through megatron-core's ``parallel_state`` (so its tensor-parallel
layers and ``vocab_parallel_cross_entropy`` find the same groups), and then passed around
explicitly in a :class:`ParallelContext`. Model code reads parallel state only through the
context it was built with.

Layout (megatron's order ``tp-cp-ep-dp-pp``): ``world = tp * dp * pp``; the ranks of one
tensor-parallel group are consecutive.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class ParallelContext:
    """Where this process sits in the tp x dp x pp grid, and the groups to talk over."""
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: Optional[dist.ProcessGroup] = None
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: Optional[dist.ProcessGroup] = None
    pp_rank: int = 0
    pp_size: int = 1
    pp_group: Optional[dist.ProcessGroup] = None
    #: torch.distributed backend of the groups ("gloo" on CPU, "nccl" on GPUs).
    backend: str = "gloo"
    #: Megatron-style sequence parallelism: between the tensor-parallel regions, activations
    #: [B, T, hidden] are sharded along T over the TP group (no effect at tp_size 1).
    sequence_parallel: bool = False

    @property
    def sp(self) -> bool:
        """Sequence parallelism in effect (requested and tp_size > 1)."""
        return self.sequence_parallel and self.tp_size > 1

    def __post_init__(self):
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank={self.tp_rank} must be in [0, tp_size={self.tp_size})")
        if self.tp_group is not None and self.tp_group.size() != self.tp_size:
            raise ValueError(f"tp_group has {self.tp_group.size()} ranks but tp_size={self.tp_size}")

    def megatron_config(self, params_dtype: torch.dtype = torch.float32):
        """A megatron ``ModelParallelConfig`` for the tensor-parallel layers.

        ``use_cpu_initialization``: every rank builds the full (master) weight from the same
        seed and keeps its shard, so initial weights do not depend on the TP size.
        """
        from megatron.core import ModelParallelConfig
        return ModelParallelConfig(
            tensor_model_parallel_size=self.tp_size,
            pipeline_model_parallel_size=self.pp_size,
            pipeline_dtype=params_dtype,   # megatron requires it when pp > 1 (unused: DeepSpeed runs the pipeline)
            params_dtype=params_dtype,
            use_cpu_initialization=True,
            perform_initialization=True,
            sequence_parallel=False,
            gradient_accumulation_fusion=False,
        )

    @classmethod
    def from_parallel_state(cls) -> "ParallelContext":
        """Read the groups megatron's parallel_state holds (call after :func:`init_parallel`)."""
        from megatron.core import parallel_state as ps
        return cls(
            tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
            tp_group=ps.get_tensor_model_parallel_group(),
            dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
            dp_group=ps.get_data_parallel_group(),
            pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
            pp_group=ps.get_pipeline_model_parallel_group(),
            backend=dist.get_backend(),
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: Optional[str] = None) -> None:
    """Initialize torch.distributed once.

    Under a launcher (torchrun, srun exporting RANK/WORLD_SIZE) the environment is used;
    otherwise a single-process world on a free local port, so that the same code path (and
    megatron's layers, which want a process group even at TP=1) runs in one process.
    """
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # an in-process store: no port to collide with, and nothing written to os.environ that
        # child processes (a Slurm job submitted from here, a test's workers) would inherit
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend)


def init_parallel(tp: int = 1, pp: int = 1, backend: Optional[str] = None, *,
                  sequence_parallel: bool = False) -> ParallelContext:
    """torch.distributed + megatron parallel_state (tp x dp x pp) -> this rank's ParallelContext.

    Idempotent for the same (tp, pp); re-initializing with other sizes destroys the old
    model-parallel groups first. ``sequence_parallel`` is recorded in the context (the model
    reads it at construction).
    """
    import dataclasses
    ctx = _init_parallel(tp, pp, backend)
    return dataclasses.replace(ctx, sequence_parallel=sequence_parallel)


def _init_parallel(tp: int, pp: int, backend: Optional[str]) -> ParallelContext:
    from megatron.core import parallel_state as ps
    init_distributed(backend)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by parallel.tp * parallel.pp = {tp} * {pp}")
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) == (tp, pp):
            return ParallelContext.from_parallel_state()
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return ParallelContext.from_parallel_state()


def destroy_parallel() -> None:
    """Tear down megatron's groups and torch.distributed (call at exit: gloo can abort without it)."""
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
