"""Narrow fixes for DeepSpeed 0.19 limitations that megafire's models hit (applied idempotently).

* ZeRO-3 converts each parameter by broadcasting ``param.data.view(torch.uint8)``, which
  fails for 0-dim parameters (FIRE's c and L): broadcast a 1-element view of the same
  storage instead. ``ds_shape`` stays ``()``, so gathered parameters and ``zero_to_fp32``
  keep the true shape.
* ZeRO 1-2's step checks the gradients one tensor at a time (``foreach_grad_checks``).
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


def foreach_grad_checks(optimizer) -> bool:
    """Give a ZeRO 1-2 optimizer (``DeepSpeedZeroOptimizer``, not offloaded) multi-tensor
    versions of the two per-gradient loops of its ``step()``; returns whether it applied.

    DeepSpeed 0.19.8 tests every gradient for inf / NaN (``amax``, ``amin``, two ``isfinite``:
    ~15 small kernels per tensor) and takes every gradient's L2 norm separately (a cast to fp64,
    the norm, a copy). For a 125M GPT that is ~2,700 launches per optimizer step with the GPU
    idle: 65 of 275 ms of a profiled step (docs/benchmarks.md). Here each is one
    ``torch._foreach_norm`` over the list:

    * overflow: ``max_i ||g_i||_inf`` is non-finite iff some element is inf or NaN (the
      maximum propagates NaN) -- the same answer as the per-tensor test;
    * ``||g||_2 = sqrt(sum_i ||g_i||_2^2)`` with each norm accumulated in DeepSpeed's norm dtype
      (fp64 where supported), over the same gradients: padding skipped, pipeline-replicated
      parameters counted once, model-parallel replicas only on model-parallel rank 0; then
      the same all-reduces and inf / NaN masking as DeepSpeed's ``get_grad_norm_direct``.
    """
    import types

    from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.stage_1_and_2 import PIPE_REPLICATED, DeepSpeedZeroOptimizer
    from deepspeed.runtime.zero.utils import get_norm_dtype
    from deepspeed import comm as dist
    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload:
        return False
    if getattr(optimizer, "megafire_foreach_checks", False):
        return True
    original_norm = optimizer.get_grad_norm_direct

    def has_overflow_partitioned_grads_serial(self):
        grads = [g for i in range(len(self.bit16_groups)) for g in self.averaged_gradients[i]
                 if g is not None and g.numel()]
        flag = torch.zeros([1], dtype=torch.bool, device=self.device)
        for dtype in {g.dtype for g in grads}:     # one stack per dtype (bf16 weights, fp32 encodings)
            norms = torch._foreach_norm([g for g in grads if g.dtype == dtype], float("inf"))
            flag |= (~torch.isfinite(torch.stack(norms))).any()
        return flag

    def get_grad_norm_direct(self, gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return original_norm(gradients, params, norm_type)
        kept = [g for g, p in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params)
                if not (hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated)
                and (is_model_parallel_parameter(p) or self.model_parallel_rank == 0)]
        if kept:
            norms = torch._foreach_norm([g.detach() for g in kept], 2, dtype=get_norm_dtype())
            total = torch.stack(norms).to(self.device).pow(2).sum().float()
        else:
            total = torch.tensor(0.0, dtype=torch.float32, device=self.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
        self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
        total = total.pow(0.5)
        mask_nan_or_inf_with_val_inplace(total, device=self.device)
        return total

    optimizer.has_overflow_partitioned_grads_serial = types.MethodType(has_overflow_partitioned_grads_serial,
                                                                       optimizer)
    optimizer.get_grad_norm_direct = types.MethodType(get_grad_norm_direct, optimizer)
    optimizer.megafire_foreach_checks = True
    return True


def apply_all() -> None:
    patch_zero3_0d_params()
