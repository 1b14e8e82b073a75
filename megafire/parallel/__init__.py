"""Process groups and parallel wiring; model code receives a ParallelContext, never globals."""
from __future__ import annotations

from .context import ParallelContext, destroy_parallel, init_distributed, init_parallel
from .layout import check_layout
from .pipeline import build_pipeline
from .grads import (allreduce_tp_replicated_grads, install_tp_replicated_grad_hooks, mark_tp_sharded_encoding_params,
                    tp_replicated_params)

__all__ = ["ParallelContext", "init_parallel", "init_distributed", "destroy_parallel",
           "allreduce_tp_replicated_grads", "install_tp_replicated_grad_hooks", "mark_tp_sharded_encoding_params",
           "tp_replicated_params",
           "check_layout", "build_pipeline"]
