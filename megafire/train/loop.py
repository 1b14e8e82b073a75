"""The training loop: set-up, resume, steps, logging, checkpoints.

One optimizer step = ``A`` micro-steps per data-parallel rank (``A`` constant), each on
``b_k`` sequences of the current stage's length ``s_k`` (``b_k * s_k`` constant), then one
DeepSpeed step at the rate ``lr((step + 1) * T)`` (megafire.train.schedule). The logged
loss is the mean over micro-steps and data-parallel ranks of each micro-batch's mean token
loss. Everything a resumed run needs to continue the same trace is in the checkpoint:
weights and optimizer state (DeepSpeed), loader position and RNG states (ours); the stage
and the rate are pure functions of the step. A step with a non-finite loss or gradient norm
has its update skipped on every rank (its data is consumed, the rate moves on) or stops the
run, and no checkpoint is written with a non-finite weight (megafire.train.faults).

A run stops early -- checkpoint after the current step, exit 124 -- on SIGTERM or SIGUSR1, or
when the file ``run.dir/STOP`` exists (checked by rank 0 at every step boundary and removed once
honoured; one present at start stops the run after its first step). The file is the path that
does not depend on a signal reaching every process: the Slurm scripts write it before forwarding
SIGUSR1 and remove a stale one before each run (slurm/lib.sh); a user can ``touch`` it.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
import yaml

from megafire.config import Config, ConfigError, flatten

from . import checkpoint as ckpt
from . import faults
from .components import (DataBundle, LanguageModelLoss, build_data, build_model, check_vocab, encoding_log_values,
                         encodings_of, peak_flops_per_device, train_flops_per_token)
from .curriculum import Curriculum
from .engine import (build_ds_config, clip_gradients, initialize_engine, manual_clipping, set_lr, setup_parallel)
from .metrics import MetricsLog, Progress
from .schedule import lr_at_step

Callback = Callable[["Trainer", dict], None]

#: ``run.dir/STOP``: a stop request by file (module docstring; slurm/README.md)
STOP_FILE = "STOP"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int                 # optimizer steps done (including those before a resume)
    tokens: int
    final_loss: float
    stopped_by_signal: bool
    skipped_steps: int = 0     # steps whose update was skipped for a non-finite loss / grad norm (faults)


def log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(f"[megafire.train] {msg}", file=sys.stderr, flush=True)


def train(cfg: Config, *, ds_config_override: Optional[dict] = None, callbacks: Iterable[Callback] = (),
          model_factory=build_model, data_factory=build_data, save_final: bool = True) -> TrainResult:
    """Train ``cfg`` in this process (one rank of a launcher's world, or a world of one).

    ``callbacks`` run on every rank after each step with ``(trainer, record)``;
    ``model_factory(cfg, ctx)`` / ``data_factory(cfg, ctx)`` replace the GPT / the loader;
    ``save_final=False`` skips the checkpoint at the last step (benchmarks).
    The process group is destroyed on exit, error or not, if this call created it (re-creating
    one under torchrun hangs on its rendezvous store, so several runs in one launch share one).
    """
    from megafire.parallel import destroy_parallel
    owns_world = not dist.is_initialized()
    ctx = setup_parallel(cfg)
    try:
        trainer = Trainer(cfg, ctx, ds_config_override=ds_config_override, callbacks=callbacks,
                          model_factory=model_factory, data_factory=data_factory, save_final=save_final)
        return trainer.run()
    finally:
        if owns_world:   # a caller that set up the world itself (several runs under torchrun) keeps it
            destroy_parallel()


class Trainer:
    """State of one training process; see :func:`train`."""

    def __init__(self, cfg: Config, ctx, *, ds_config_override=None, callbacks=(), model_factory=build_model,
                 data_factory=build_data, save_final: bool = True):
        self.cfg, self.ctx, self.save_final = cfg, ctx, save_final
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.callbacks = list(callbacks)
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.curriculum = Curriculum.from_config(cfg, ctx.dp_size)
        self._check_parallel_support()
        resume_from = self._resume_target()
        if self.world > 1:   # every rank decides before rank 0 writes into run.dir (run() start)
            dist.barrier()
        self.data: DataBundle = data_factory(cfg, ctx)
        check_vocab(cfg, self.data)
        torch.manual_seed(cfg.train.seed)
        self.model = model_factory(cfg, ctx)
        self.perf = self._apply_perf()
        self.ds_config = build_ds_config(cfg, self.curriculum, ds_config_override)
        self.engine = initialize_engine(self._engine_module(), cfg, self.ds_config, ctx)
        faults.install_step_guard(self.engine)
        self.faults = faults.SkipPolicy(cfg.train)
        self.encodings = self._stage_encodings()
        self.start_step = self._resume(resume_from) if resume_from else 0
        self.stop_requested, self.stop_reason = False, ""
        self.last_checkpoint: Optional[Path] = resume_from

    # --- set-up ------------------------------------------------------------------------
    def _check_parallel_support(self) -> None:
        from megafire.parallel import check_layout
        check_layout(self.cfg, self.world)

    def _apply_perf(self):
        """The ``perf`` switches (megafire.model.perf), resolved for this run and applied to the
        model before DeepSpeed wraps it."""
        from megafire.model import perf
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        flags = perf.resolve(self.cfg.perf, device_type=device_type, tp=self.ctx.tp_size,
                             sequence_parallel=self.cfg.parallel.sequence_parallel,
                             zero_stage=self.cfg.parallel.zero_stage, pp=self.ctx.pp_size,
                             activation_checkpointing=self.cfg.parallel.activation_checkpointing)
        perf.apply(self.model, flags, device_type)
        log(flags.describe(), self.rank)
        return flags

    @property
    def pipeline(self) -> bool:
        return self.ctx.pp_size > 1

    def _engine_module(self):
        """The module DeepSpeed drives: the GPT behind a loss wrapper, or this stage of a pipeline.

        TP-replicated parameters (FIRE's MLP, c, L) get their gradient summed over the TP group
        by hooks inside backward, before ZeRO reduces or partitions it and before clipping;
        per-head encoding parameters count as TP-sharded in gradient norms.
        """
        from megafire.parallel import (build_pipeline, install_tp_replicated_grad_hooks,
                                       mark_tp_sharded_encoding_params)
        install_tp_replicated_grad_hooks(self.model, self.ctx.tp_group)
        mark_tp_sharded_encoding_params(self.model, self.ctx.tp_size)
        if not self.pipeline:
            return LanguageModelLoss(self.model)
        return build_pipeline(self.model, self.ctx, activation_checkpointing=self.cfg.parallel.activation_checkpointing,
                              dynamic_shape=len(self.curriculum.stages) > 1)

    def _stage_encodings(self):
        """The encodings whose parameters this rank trains (a pipeline stage holds only some)."""
        found = encodings_of(self.model)
        if not self.pipeline:
            return found
        mine = {id(p) for p in self.engine.module.parameters()}
        return {k: e for k, e in found.items() if any(id(p) in mine for p in e.parameters())}

    def _resume_target(self) -> Optional[Path]:
        """The checkpoint to resume from; refuses to overwrite an existing run by accident, to resume
        from a damaged checkpoint (unless train.resume_fallback) or from one of another model or
        layout. Rank 0 decides (and moves damaged checkpoints aside); every rank gets its answer."""
        if not self.cfg.train.resume:
            if ckpt.latest_checkpoint(self.ckpt_root) is not None or (self.run_dir / "metrics.jsonl").exists():
                raise ConfigError(f"run.dir={str(self.run_dir)!r} already holds a run; pass --train.resume=true "
                                  "to continue it or choose another run.dir")
            return None
        decision: list = [None]
        if self.rank == 0:
            try:
                found = ckpt.find_checkpoint(
                    self.ckpt_root, fallback=self.cfg.train.resume_fallback, move_damaged=True, warn=log,
                    fallback_hint="pass --train.resume_fallback=true to move it aside and resume from the newest "
                                  "complete checkpoint")
                if found is not None:
                    self._check_fits(found)
                decision = [("ok", found)]
            except ConfigError as e:
                decision = [("error", str(e))]
        if self.world > 1:
            dist.broadcast_object_list(decision, src=0)
        kind, value = decision[0]
        if kind == "error":
            raise ckpt.CheckpointError(value)
        if value is None:
            log(f"train.resume=true but {self.ckpt_root} has no checkpoint: starting from step 0", self.rank)
        return value

    #: model keys that do not change the function or the weights' shapes (initialization, kernel choice)
    RESUME_FREE_MODEL_KEYS = ("model.init_std", "model.position.fused_rotary")

    def _check_fits(self, path: Path) -> None:
        """Before DeepSpeed loads anything: same model (config keys) and layout as the checkpoint."""
        meta = json.loads((path / "meta.json").read_text())
        expected = {"world_size": self.world, "tp": self.ctx.tp_size, "pp": self.ctx.pp_size,
                    "tokens_per_step": self.cfg.train.tokens_per_step}
        for key, value in expected.items():
            if meta.get(key) != value:
                raise ConfigError(f"cannot resume {path}: it was written with {key}={meta.get(key)}, this run has "
                                  f"{key}={value}")
        saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
        theirs, ours = flatten(saved.get("model") or {}, "model"), flatten(self.cfg.to_dict()["model"], "model")
        differ = [f"{k}: checkpoint {theirs[k]!r}, this run {ours[k]!r}" for k in ours
                  if k in theirs and theirs[k] != ours[k] and k not in self.RESUME_FREE_MODEL_KEYS]
        if differ:
            raise ConfigError(f"cannot resume {path}: its model differs from this run's: {'; '.join(differ)} (resume "
                              f"with the checkpoint's model settings, see its config.yaml, or start a new run.dir)")

    def _resume(self, path: Path) -> int:
        meta = json.loads((path / "meta.json").read_text())   # verified and checked by _resume_target
        if self.data.tokenizer_sha256 and meta.get("tokenizer_sha256") not in (None, self.data.tokenizer_sha256):
            raise ConfigError(f"cannot resume {path}: it was trained with tokenizer sha256 "
                              f"{meta['tokenizer_sha256'][:12]}, this run's tokenizer is {self.data.tokenizer_sha256[:12]}")
        meta, state = ckpt.load_checkpoint(self.engine, path, rank=self.rank, verify=False)
        self.faults = faults.SkipPolicy(self.cfg.train, **state.get("faults", {}))
        self.data.source.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])
        log(f"resumed from {path} at step {meta['step']} ({meta['tokens']:,} tokens)", self.rank)
        return int(meta["step"])

    # --- one step ----------------------------------------------------------------------
    def train_step(self, stage) -> tuple[float, Optional[float]]:
        """A optimizer-step's micro-steps; returns (loss averaged over micro-steps and dp, grad norm)."""
        engine, grad_norm = self.engine, None
        if self.pipeline:
            return self._pipeline_step(stage)
        losses = []
        for _ in range(self.curriculum.grad_accum):
            batch = self.data.source.next_batch(stage.micro_batch_size, stage.seq_len)
            batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
            if self.perf.cuda_graphs:   # a new replay of the blocks' graphs (megafire.model.perf)
                torch.compiler.cudagraph_mark_step_begin()
            loss = engine(**batch)
            losses.append(loss.detach().float())
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary and faults.any_nonfinite(losses, engine.device):
                loss = loss * float("nan")   # NaN gradients on every rank: the optimizer skips the update (faults)
            engine.backward(loss)   # TP-replicated gradients are summed by hooks inside backward
            if boundary and manual_clipping(self.cfg):
                grad_norm = clip_gradients(engine, self.cfg.train.grad_clip, self.ctx.tp_group)
            engine.step()
        mean = torch.stack(losses).mean()
        if self.ctx.dp_size > 1:
            dist.all_reduce(mean, group=self.ctx.dp_group)
            mean /= self.ctx.dp_size
        if grad_norm is None:
            norm = engine.get_global_grad_norm()
            grad_norm = None if norm is None else float(norm)
        return float(mean), grad_norm

    def _pipeline_step(self, stage) -> tuple[float, Optional[float]]:
        """One optimizer step through DeepSpeed's pipeline schedule (all micro-batches, the
        tied-weight and data-parallel reductions, clipping, step). Every stage draws the same
        batches (the first uses inputs, the last labels), so loader states stay in step."""
        engine = self.engine
        micro = []
        for _ in range(self.curriculum.grad_accum):
            b = {k: v.to(engine.device, non_blocking=True)
                 for k, v in self.data.source.next_batch(stage.micro_batch_size, stage.seq_len).items()}
            segment_ids = b.get("segment_ids")
            if segment_ids is None:
                segment_ids = torch.zeros_like(b["input_ids"])
            micro.append(((b["input_ids"], b["positions"], segment_ids), b["labels"]))
        loss = engine.train_batch(data_iter=iter(micro))
        norm = engine.get_global_grad_norm()
        return float(loss), None if norm is None else float(norm)

    # --- the run -----------------------------------------------------------------------
    def run(self) -> TrainResult:
        from megafire.tracking import Tracker
        cfg, cur = self.cfg, self.curriculum
        main = self.rank == 0
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temps(self.ckpt_root)
            cfg.save(self.run_dir / "config.yaml")
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", keep_through_step=self.start_step, enabled=main)
        tracker = Tracker(cfg, rank=self.rank).start()
        progress = Progress(cfg.train.max_steps, self.start_step, enabled=main and cfg.train.progress)
        log(f"{self.world} rank(s), dp={self.ctx.dp_size} tp={self.ctx.tp_size} pp={self.ctx.pp_size}, "
            f"zero={cfg.parallel.zero_stage}, {cfg.train.precision}; {cur.describe()}", self.rank)
        restore = self._install_signal_handlers()
        loss, step, status = float("nan"), self.start_step, "FAILED"
        try:
            for step in range(self.start_step, cfg.train.max_steps):
                record = self._step(step)
                loss = record["loss"]
                metrics.write(record)
                if (step + 1) % max(cfg.train.log_every_steps, 1) == 0:
                    tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step=step + 1)
                self.faults.check(step + 1, loss, record["grad_norm"], self.last_checkpoint)
                progress.update(step, loss, record["tokens_per_s"])
                for callback in self.callbacks:
                    callback(self, record)
                stop = self._agree_on_stop()
                every = cfg.train.checkpoint_every_steps
                final = step + 1 == cfg.train.max_steps and self.save_final
                if stop or final or (every and (step + 1) % every == 0):
                    self.save(step + 1)
                if stop:
                    if main:   # after the commit: the resumed run must not stop on the same request
                        (self.run_dir / STOP_FILE).unlink(missing_ok=True)
                    log(f"stopping on request ({self.stop_reason}) after step {step + 1}; resume with "
                        "--train.resume=true", self.rank)
                    break
            else:
                step = cfg.train.max_steps - 1
            status = "KILLED" if self.stop_requested else "FINISHED"
        finally:
            restore()
            progress.close()
            metrics.close()
            if status != "FAILED":
                tracker.log_artifact(self.run_dir / "config.yaml")
                tracker.log_artifact(self.run_dir / "metrics.jsonl")
            tracker.end(status)
        return TrainResult(self.run_dir, step + 1, (step + 1) * cfg.train.tokens_per_step, loss,
                           self.stop_requested, self.faults.skipped_steps)

    def _step(self, step: int) -> dict:
        """Train step ``step`` (0-based) and return its metrics record."""
        cfg, cur = self.cfg, self.curriculum
        stage = cur.stage_at(step)
        if step == stage.first_step or step == self.start_step:
            log(f"stage {stage.index}: seq_len {stage.seq_len}, micro-batch {stage.micro_batch_size} from step "
                f"{step}", self.rank)
        lr = lr_at_step(step, cfg)
        set_lr(self.engine, lr)
        t0 = time.perf_counter()
        skipped_before = self.engine.skipped_steps
        loss, grad_norm = self.train_step(stage)
        skipped = self.engine.skipped_steps > skipped_before   # the optimizer did not apply the update
        if skipped:
            faults.after_skipped_step(self.engine)
        if cfg.train.precision == "fp16":   # a loss-scale overflow is the scaler's business, not a fault
            bad = not math.isfinite(loss)
        else:
            bad = skipped or faults.SkipPolicy.nonfinite(loss, grad_norm)
        if bad:
            log(f"step {step + 1}: loss {loss:.4g}, grad norm {grad_norm} not finite: update "
                f"{'skipped' if skipped else 'APPLIED (the optimizer did not skip it)'}", self.rank)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens_per_s = cur.tokens_per_step / dt
        peak = peak_flops_per_device(cfg.train.precision)
        flops = train_flops_per_token(self.model, stage.seq_len) if peak else None
        mfu = flops * tokens_per_s / (peak * self.world) if flops else None
        return {"step": step + 1, "tokens": cur.tokens_before(step + 1), "loss": loss, "lr": lr,
                "seq_len": stage.seq_len, "micro_batch_size": stage.micro_batch_size, "stage": stage.index,
                "tokens_per_s": tokens_per_s, "step_time_s": dt, "grad_norm": grad_norm, "mfu": mfu,
                "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
                "skipped": skipped, "skipped_steps": self.faults.record(bad), **encoding_log_values(self.encodings)}

    # --- checkpoints and signals -------------------------------------------------------
    def save(self, steps_done: int, before_commit=None) -> Path:
        """Checkpoint after ``steps_done`` optimizer steps (all ranks call this); never one with a
        non-finite weight: that raises faults.TrainingDiverged before anything is written."""
        bad_weight = faults.first_nonfinite_parameter(self.engine.module, self.engine.device)
        if bad_weight is not None:
            raise faults.diverged_weights(steps_done, bad_weight, self.last_checkpoint)
        stage = self.curriculum.stage_at(steps_done - 1)
        meta = {"tokens": self.curriculum.tokens_before(steps_done), "stage": stage.index, "seq_len": stage.seq_len,
                "world_size": self.world, "tp": self.ctx.tp_size, "pp": self.ctx.pp_size, "dp": self.ctx.dp_size,
                "tokens_per_step": self.cfg.train.tokens_per_step, "zero_stage": self.cfg.parallel.zero_stage,
                "precision": self.cfg.train.precision, "tokenizer_sha256": self.data.tokenizer_sha256}
        if self.pipeline:   # layer index -> GPT sub-module, for megafire.train.universal
            from megafire.parallel.pipeline import layer_prefixes
            meta["pipeline_layers"] = layer_prefixes(self.model)
        rank_state = {"step": steps_done, "loader": self.data.source.state_dict(), "rng": ckpt.rng_state(),
                      "faults": self.faults.state_dict()}
        self.last_checkpoint = ckpt.save_checkpoint(
            self.engine, self.ckpt_root, step=steps_done, meta=meta, rank_state=rank_state,
            config_yaml=yaml.safe_dump(self.cfg.to_dict(), sort_keys=False), keep=self.cfg.train.keep_checkpoints,
            rank=self.rank, barrier=dist.barrier, before_commit=before_commit)
        return self.last_checkpoint

    def _install_signal_handlers(self):
        """SIGTERM / SIGUSR1 (Slurm's warning before the time limit): checkpoint after this step, stop."""
        import threading
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        def handler(signum, frame):
            self.stop_requested = True
            self.stop_reason = signal.Signals(signum).name
        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGUSR1)}
        return lambda: [signal.signal(s, h) for s, h in previous.items()]

    def _agree_on_stop(self) -> bool:
        """Every rank must stop after the same step, even if only some got the signal; the
        stop file is read by rank 0 only (one stat per step) and reaches the others here."""
        if not self.stop_requested and self.rank == 0 and (self.run_dir / STOP_FILE).exists():
            self.stop_requested, self.stop_reason = True, f"file {self.run_dir / STOP_FILE}"
        if self.world == 1:
            return self.stop_requested
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.stop_requested:
            self.stop_requested, self.stop_reason = True, "another rank's request"
        return self.stop_requested

