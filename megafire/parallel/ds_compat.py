"""Narrow fixes for DeepSpeed 0.19 limitations that megafire's models hit (applied idempotently).

* ZeRO-3 converts each parameter by broadcasting ``param.data.view(torch.uint8)``, which
  fails for 0-dim parameters (FIRE's c and L): broadcast a 1-element view of the same
  storage instead. ``ds_shape`` stays ``()``, so gathered parameters and ``zero_to_fp32``
  keep the true shape.
"""
from __future__ import annotations

import importlib

import torch


def skip_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce op (~75 s, inference only) when its
    comm backend starts: report it as unavailable instead (training uses gloo / NCCL)."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def init_deepspeed_comm(backend: str) -> None:
    """deepspeed.comm over the already initialized torch.distributed world (pipelines need it
    before deepspeed.initialize)."""
    import deepspeed.comm as ds_dist
    skip_shm_build()
    if not ds_dist.is_initialized():
        ds_dist.init_distributed(dist_backend=backend, auto_mpi_discovery=False, dist_init_required=False)


def patch_zero3_0d_params() -> None:
    from deepspeed import comm as dist
    from deepspeed.runtime.zero.partition_parameters import Init
    if getattr(Init._zero_init_param, "megafire_0d_safe", False):
        return

    def _zero_init_param(self, param):
        self._convert_to_deepspeed_param(param)
        group = self.get_partition_dp_group(param)
        src = 0 if dist.get_world_group() == group else dist.get_global_rank(group, 0)
        dist.broadcast(param.data.reshape(-1).view(torch.uint8), src, group)
        param.partition()
    _zero_init_param.megafire_0d_safe = True
    Init._zero_init_param = _zero_init_param


def apply_all() -> None:
    patch_zero3_0d_params()
