"""Non-finite losses, gradients and weights: skip the step (bounded) or stop; never checkpoint them.

A step is *non-finite* when the loss of any of its micro-batches on any rank, or its global
gradient norm, is NaN or inf. Its optimizer update is then not applied, on every rank alike:

* the loss is known before backward: at the accumulation boundary a non-finite flag over this
  step's micro-batch losses is all-reduced (MAX, whole world) and, if set, every rank
  back-propagates ``loss * NaN``, so that every gradient is NaN;
* non-finite gradients then take the optimizer's own skip path: DeepSpeed's ZeRO-1/2/3 and bf16
  optimizers compute the global norm (reduced over the data- and model-parallel groups) and
  return without an update when it is not finite; a plain torch optimizer (ZeRO-0 fp32) is
  wrapped by :func:`install_step_guard`, which checks its gradients, all-reduces the flag and
  skips ``step()``. Either way DeepSpeed counts the step in ``engine.skipped_steps``.

Pipelines (DeepSpeed's schedule computes the loss inside ``train_batch``) rely on the
gradient norm alone. A skipped step leaves the weights and the optimizer state (moments, step count) as they were;
the LR schedule and the data position advance as on any step: the step's batches are consumed.
``train.nonfinite=stop`` stops at the first such step; ``skip`` (default, as Megatron/NeMo and
the PaLM/OPT runs do) stops after ``train.max_skipped_consecutive`` of them in a row, or once
more than ``max(train.max_skipped_consecutive, train.max_skipped_fraction * steps done)`` were
skipped in all. Stopping raises :class:`TrainingDiverged` (``megafire train`` exits 3).
Before every checkpoint all weights are checked (:func:`first_nonfinite_parameter`): a checkpoint
with a non-finite weight is never written, ``latest`` never moves to one and pruning never runs.
fp16 runs skip steps whose gradients overflow the loss scale (DeepSpeed's loss scaler): those are
not counted here unless the loss itself is not finite.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist

#: the config keys a divergence message points at
KEYS = "train.lr, train.warmup_tokens, train.grad_clip, train.nonfinite, train.max_skipped_consecutive, " \
       "train.max_skipped_fraction"


#: ``megafire train``'s exit status on :class:`TrainingDiverged` (2 is a bad config, 124 a signal stop)
EXIT_DIVERGED = 3


class TrainingDiverged(RuntimeError):
    """Training stopped on non-finite values; the message names the step, the values and the keys to change."""


def _world_max(flag: torch.Tensor) -> bool:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def any_nonfinite(values: Iterable[torch.Tensor], device) -> bool:
    """True on every rank when any rank's ``values`` hold a NaN or inf (one all-reduce, one sync)."""
    flags = [(~torch.isfinite(v.detach())).any() for v in values if v.numel()]
    local = torch.stack(flags).any().float().reshape(1).to(device) if flags else torch.zeros(1, device=device)
    return _world_max(local)


def install_step_guard(engine) -> None:
    """Make a plain torch optimizer (ZeRO-0 fp32) skip ``step()`` on non-finite gradients.

    DeepSpeed's own optimizer wrappers (ZeRO 1-3, bf16, fp16) carry an ``overflow`` flag and
    skip by themselves; for the others this sets ``optimizer.overflow`` the way they do, which
    ``DeepSpeedEngine._take_model_step`` reads to count the step as skipped.
    """
    opt = engine.optimizer
    if hasattr(opt, "overflow") or getattr(opt, "megafire_step_guard", False):
        return
    original = opt.step

    def guarded_step(*args, **kwargs):
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        opt.overflow = any_nonfinite(grads, engine.device)
        return None if opt.overflow else original(*args, **kwargs)

    opt.overflow = False
    opt.step = guarded_step
    opt.megafire_step_guard = True


def after_skipped_step(engine) -> None:
    """DeepSpeed's ZeRO-3 returns from a skipped step before it re-gathers its persistent (small)
    parameters, as a normal step does; re-gather them so that reading one outside forward (the
    logged FIRE c and L) sees its values, not an empty partition."""
    persistent = getattr(engine.optimizer, "persistent_parameters", None)
    if persistent:
        persistent[0].all_gather(persistent)


def _local_tensor(p: torch.Tensor) -> torch.Tensor:
    """This rank's values of ``p``: all of it, or under ZeRO-3 its partition without the padding.

    ZeRO-3 splits the flattened parameter into equal partitions allocated with ``torch.empty``;
    the last rank's partition ends in padding that no weight was ever copied into, and reading
    it found "non-finite weights" at random (uninitialized memory)."""
    if not hasattr(p, "ds_tensor"):
        return p
    part = p.ds_tensor.ds_numel
    group = getattr(p, "ds_process_group", None)
    rank = dist.get_rank(group=group) if dist.is_initialized() else 0
    valid = max(0, min(part, p.ds_numel - rank * part))   # the partition covers [rank * part, (rank + 1) * part)
    return p.ds_tensor.view(-1)[:valid]


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> Optional[tuple[str, int, int]]:
    """(name, non-finite count, size) of the first tensor holding a NaN or inf, else None (one
    device sync when all are finite)."""
    tensors = [(name, t.detach()) for name, t in named
               if torch.is_tensor(t) and torch.is_floating_point(t) and t.numel()]
    if not tensors:
        return None
    flags = torch.stack([(~torch.isfinite(t)).any().to(tensors[0][1].device) for _, t in tensors])
    if not bool(flags.any()):
        return None
    name, t = tensors[int(flags.nonzero()[0, 0])]
    return name, int((~torch.isfinite(t)).sum()), t.numel()


def first_nonfinite_parameter(module, device) -> Optional[str]:
    """Collective: on every rank, a description of a non-finite weight on some rank, else None."""
    found = first_nonfinite((n, _local_tensor(p)) for n, p in module.named_parameters())
    if not _world_max(torch.tensor([0.0 if found is None else 1.0], device=device)):
        return None
    if found is None:
        return "a weight held by another rank"
    name, bad, size = found
    return f"{name} ({bad} of {size} values NaN or inf)"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


class SkipPolicy:
    """Counts non-finite steps and decides, per ``train.nonfinite`` and its bounds, when to stop."""

    def __init__(self, train_cfg, skipped_steps: int = 0, consecutive: int = 0):
        self.cfg = train_cfg
        self.skipped_steps = skipped_steps
        self.consecutive = consecutive

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    @staticmethod
    def nonfinite(loss: float, grad_norm: Optional[float]) -> bool:
        return not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm))

    def record(self, bad: bool) -> int:
        """Count one step (``bad``: its loss or grad norm was not finite); returns the skipped total."""
        if bad:
            self.skipped_steps += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
        return self.skipped_steps

    def check(self, steps_done: int, loss: float, grad_norm: Optional[float], last_checkpoint) -> None:
        """After :meth:`record` of step ``steps_done`` (1-based): raise :class:`TrainingDiverged` if it
        was non-finite and the policy says stop."""
        if not self.consecutive:
            return
        c = self.cfg
        allowed_total = max(c.max_skipped_consecutive, c.max_skipped_fraction * steps_done)
        if c.nonfinite == "stop":
            why = "train.nonfinite=stop"
        elif self.consecutive >= c.max_skipped_consecutive:
            why = f"{self.consecutive} non-finite steps in a row (train.max_skipped_consecutive=" \
                  f"{c.max_skipped_consecutive})"
        elif self.skipped_steps > allowed_total:
            why = f"{self.skipped_steps} of {steps_done} steps skipped, more than max(train.max_skipped_consecutive=" \
                  f"{c.max_skipped_consecutive}, train.max_skipped_fraction={c.max_skipped_fraction} x steps)"
        else:
            return
        where = f"the last checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
        raise TrainingDiverged(
            f"training diverged at step {steps_done}: loss {_fmt(loss)}, grad norm {_fmt(grad_norm)} (not finite); "
            f"stopped after {why}; the update was not applied and no checkpoint was written for it ({where}). "
            f"Lower train.lr, lengthen train.warmup_tokens or tighten train.grad_clip and resume with "
            f"--train.resume=true, or loosen the bounds (keys: {KEYS})")


def diverged_weights(steps_done: int, weight: str, last_checkpoint) -> TrainingDiverged:
    where = f"`latest` still names {last_checkpoint}" if last_checkpoint else "no checkpoint exists"
    return TrainingDiverged(
        f"training diverged by step {steps_done}: weight {weight} is not finite; checkpoint step {steps_done} was "
        f"not written ({where}). Lower train.lr or lengthen train.warmup_tokens and resume from the last "
        f"checkpoint with --train.resume=true (keys: {KEYS})")
