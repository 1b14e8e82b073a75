"""DeepSpeed set-up: distributed init, the ds_config built from our Config, the engine.

DeepSpeed is the engine in every run, single process included, so one code path is
tested on CPU and used on clusters. Two run-time C++ builds are avoided on purpose:
``deepspeed.initialize`` JIT-compiles a shared-memory all-reduce op (``shm_comm``, ~75 s,
used only for inference) unless ``deepspeed.comm.torch.build_shm_op`` is replaced, and
optimizer type "Adam" compiles FusedAdam (~115 s); we pass a torch ``AdamW`` as the client
optimizer instead.
"""
from __future__ import annotations

import copy
import importlib
import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from megafire.config import Config, ConfigError

#: ZeRO-0 in fp32 clips gradients without returning the norm; there we clip ourselves
#: (DeepSpeed's clip_grad_norm_, model-parallel aware) and turn DeepSpeed's clipping off.
MANUAL_CLIP_PRECISIONS = ("fp32",)


def setup_parallel(cfg: Config):
    """torch.distributed (gloo on CPU, nccl on GPU) + megatron groups -> ParallelContext.

    Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT as set by torchrun, the
    deepspeed launcher or a Slurm script; without them, a single-process world.
    """
    import torch.distributed as dist

    from megafire.parallel import check_layout, init_distributed, init_parallel
    # DeepSpeed insists on LOCAL_RANK; a world of one, or srun without a wrapper, may not set it.
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if backend == "nccl" else "cpu")
    init_distributed(backend)
    check_layout(cfg, dist.get_world_size())
    return init_parallel(cfg.parallel.tp, cfg.parallel.pp, backend, sequence_parallel=cfg.parallel.sequence_parallel)


class DeepSpeedMPU:
    """The ``mpu`` object DeepSpeed asks for model/data-parallel groups, over a ParallelContext.

    "Model parallel" for DeepSpeed is tensor parallel here (pipelines bring their own grid):
    ZeRO partitions and all-reduces over the data-parallel group, and gradient-norm
    reductions count TP-sharded parameters across the model-parallel group.
    """

    def __init__(self, ctx):
        self.ctx = ctx

    def get_model_parallel_rank(self) -> int:
        return self.ctx.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.ctx.tp_size

    def get_model_parallel_group(self):
        return self.ctx.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.ctx.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.ctx.dp_size

    def get_data_parallel_group(self):
        return self.ctx.dp_group


def manual_clipping(cfg: Config) -> bool:
    return cfg.parallel.zero_stage == 0 and cfg.train.precision in MANUAL_CLIP_PRECISIONS


def build_ds_config(cfg: Config, curriculum, override: Optional[dict] = None) -> dict:
    """DeepSpeed's JSON config from ours; ``override`` (a user ds_config file) is merged last.

    ``train_micro_batch_size_per_gpu`` is the first stage's micro-batch: the curriculum
    changes the micro-batch per stage and DeepSpeed's (non-pipeline) engine never looks at
    the size of what it is fed; the accumulation count, which it does use (loss scaling by
    1/A and the step boundary), is constant for the run.
    """
    t, p = cfg.train, cfg.parallel
    precision = t.precision
    if precision == "bf16" and p.zero_stage == 0:
        raise ConfigError("train.precision=bf16 needs parallel.zero_stage >= 1 (DeepSpeed 0.19's bf16 "
                          "ZeRO-0 optimizer cannot load its own checkpoints)")
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use fp32 or bf16")
    micro = curriculum.stages[0].micro_batch_size
    ds = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": curriculum.grad_accum,
        "train_batch_size": micro * curriculum.grad_accum * curriculum.dp_size,
        "gradient_clipping": 0.0 if manual_clipping(cfg) else t.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 62,       # our own logging
        "wall_clock_breakdown": False,
    }
    if override:
        ds = _merge(ds, override)
    return ds


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config file {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config file {str(path)!r} is not valid JSON: {e}") from None


def param_groups(model: nn.Module, weight_decay: float, encoding_lr_scale: float = 1.0,
                 separate_encoding: bool = False) -> list[dict]:
    """Decay matrices only: norm gains, biases and scalar parameters (FIRE's c and L) are not
    shrunk towards 0, which for them would be a prior with no meaning.

    With ``encoding_lr_scale != 1`` (or ``separate_encoding``) the position encodings' own
    parameters (FIRE's MLP, c, L; Kerple's r1, r2; T5's table) form two more groups (decay /
    no decay) whose ``lr_scale`` key :func:`set_lr` multiplies the schedule's rate by. At 1.0
    and without ``separate_encoding`` the groups are the two above, so existing optimizer
    checkpoints keep their layout. ``train.encoding_fp32`` needs the separation: ZeRO
    flattens a group into one buffer of one dtype (a mixed group would be promoted to fp32).
    """
    from .components import encodings_of
    scaled = {id(p) for enc in encodings_of(model).values() for p in enc.parameters()} \
        if encoding_lr_scale != 1.0 or separate_encoding else set()
    decay, no_decay, enc_decay, enc_no_decay = [], [], [], []
    for p in model.parameters():
        if p.requires_grad:
            if id(p) in scaled:
                (enc_decay if p.dim() >= 2 else enc_no_decay).append(p)
            else:
                (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if scaled:
        groups += [{"params": enc_decay, "weight_decay": weight_decay, "lr_scale": encoding_lr_scale},
                   {"params": enc_no_decay, "weight_decay": 0.0, "lr_scale": encoding_lr_scale}]
    for g in groups:
        g["params"] = aligned_order(g["params"])
    return [g for g in groups if g["params"] or "lr_scale" not in g]


#: elements per 16 bytes at 2 bytes each (bf16 / fp16): the vector width compiled kernels assume
ALIGN_ELEMENTS = 8


def aligned_order(params: list) -> list:
    """Parameters whose size is a multiple of 16 bytes first, the odd-sized ones (FIRE's c, L
    and MLP biases, Kerple's per-head r1, r2) last, each part in model order.

    ZeRO 1/2 flatten a group into one buffer and give each parameter a view at its running
    offset; one odd-sized parameter early in the group would put every later weight at an
    address that is not 16-byte aligned, and compiled (inductor) kernels that load 16 bytes
    at a time fault on such a view ("misaligned address"). The order changes no update: AdamW
    is per parameter and the gradient norm sums the same squares.
    """
    return ([p for p in params if p.numel() % ALIGN_ELEMENTS == 0]
            + [p for p in params if p.numel() % ALIGN_ELEMENTS != 0])


def _skip_shm_build() -> None:
    """Replace DeepSpeed's shm op JIT build (inference-only all-reduce) by 'not available'."""
    ds_torch = importlib.import_module("deepspeed.comm.torch")   # `import a.b.torch` would bind torch itself
    ds_torch.build_shm_op = lambda: None


def _broadcast_0d_params() -> None:
    """DeepSpeed broadcasts every parameter from rank 0 at start-up as ``p.data.view(uint8)``,
    which fails for 0-dim parameters (FIRE's c and L): show them to it as shape [1] for the
    broadcast only (no optimizer exists yet at that point, so nothing else sees the change)."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    original = DeepSpeedEngine._broadcast_model
    if getattr(original, "megafire_0d_safe", False):
        return

    def broadcast_model(self):
        zero_dim = [p for p in self.module.parameters() if p.dim() == 0]
        for p in zero_dim:
            p.data = p.data.reshape(1)
        try:
            original(self)
        finally:
            for p in zero_dim:
                p.data = p.data.reshape(())
    broadcast_model.megafire_0d_safe = True
    DeepSpeedEngine._broadcast_model = broadcast_model


def _keep_marked_params_fp32() -> None:
    """DeepSpeed's bf16 mode casts every parameter of the module to bf16 before it builds the
    optimizer; parameters flagged ``megafire_keep_fp32`` (``train.encoding_fp32``) get their fp32
    data back right after that cast. With them in param groups of their own, ZeRO-1 flattens those
    groups into fp32 buffers: the module's copy then equals the fp32 master copy after every
    step, and the gradients reach the optimizer in fp32 (checked on CPU with DeepSpeed 0.19.8,
    tests/study/test_study_precision.py). DeepSpeed's own ``keep_in_fp32_modules`` keeps buffers
    only, not parameters."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    original = DeepSpeedEngine._cast_module_mixed_precision
    if getattr(original, "megafire_keep_fp32", False):
        return

    def cast(self, *args, **kwargs):
        kept = [(p, p.data) for p in self.module.parameters()
                if getattr(p, "megafire_keep_fp32", False) and p.dtype == torch.float32]
        original(self, *args, **kwargs)
        for p, data in kept:          # the fp32 values themselves, not bf16-rounded ones
            p.data = data
    cast.megafire_keep_fp32 = True
    DeepSpeedEngine._cast_module_mixed_precision = cast


def initialize_engine(module: nn.Module, cfg: Config, ds_config: dict, ctx):
    """deepspeed.initialize with a torch AdamW client optimizer and our mpu adapter (a
    PipelineModule brings its own grid, whose groups equal megatron's: parallel.pipeline)."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    from megafire.parallel.ds_compat import foreach_grad_checks, patch_zero3_0d_params
    _skip_shm_build()
    _broadcast_0d_params()
    patch_zero3_0d_params()
    t = cfg.train
    if t.encoding_fp32:
        _keep_marked_params_fp32()
        from .components import encodings_of
        for enc in encodings_of(module).values():
            for p in enc.parameters():
                p.megafire_keep_fp32 = True
    optimizer = torch.optim.AdamW(param_groups(module, t.weight_decay, t.encoding_lr_scale, t.encoding_fp32),
                                  lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config,
                                           mpu=None if isinstance(module, PipelineModule) else DeepSpeedMPU(ctx),
                                           dist_init_required=False)
    if cfg.perf.foreach_grad_checks:
        foreach_grad_checks(engine.optimizer)
    return engine


def set_lr(engine, lr: float) -> None:
    """The rate of every param group (ZeRO wrappers expose their base optimizer's groups),
    times the group's ``lr_scale`` where it has one (param_groups: encoding_lr_scale)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def clip_gradients(engine, max_norm: float, tp_group=None) -> float:
    """Global gradient norm ``||g|| = sqrt(sum_p ||g_p||^2)``; scales every gradient by
    ``min(1, max_norm / (||g|| + 1e-6))`` when ``max_norm > 0`` (torch's and DeepSpeed's rule).

    TP-sharded parameters (megatron's ``tensor_model_parallel`` flag) contribute their
    shard's squares summed over the TP group; replicated ones count once. Written here
    because DeepSpeed's ``clip_grad_norm_`` fails on 0-dim parameters (FIRE's c and L).
    Called after the data-parallel all-reduce (DeepSpeed's backward at the boundary), so
    every rank computes the same norm.
    """
    import torch.distributed as dist
    grads = [(p.grad, getattr(p, "tensor_model_parallel", False)) for p in engine.module.parameters()
             if p.grad is not None]
    if not grads:
        return 0.0
    device = grads[0][0].device
    sharded = torch.zeros((), device=device, dtype=torch.float32)
    replicated = torch.zeros((), device=device, dtype=torch.float32)
    for g, is_sharded in grads:
        sq = g.detach().float().pow(2).sum()
        if is_sharded:
            sharded += sq
        else:
            replicated += sq
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sharded, group=tp_group)
    total = (sharded + replicated).sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g, _ in grads:
            g.mul_(coef.to(g.dtype))
    return float(total)
