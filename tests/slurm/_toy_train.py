#!/usr/bin/env python3
"""A stand-in trainer with the same command line and signal contract as `megafire train`.

    _toy_train.py [--config FILE] --run.dir=DIR --train.max_steps=N
                  [--train.checkpoint_every_steps=K] [--train.resume=true] [--toy.step_seconds=S]

Two or more gloo processes (env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as
launch/task.sh exports them). Each step all-reduces a tensor; rank 0 appends a JSON line to
DIR/metrics.jsonl. Checkpoints go to DIR/checkpoints/step_NNNNNNNN/ (written to a temporary name and
renamed), then DIR/checkpoints/latest (a text file with the tag) moves last. The contract of
slurm/README.md: on SIGUSR1 or SIGTERM, or when DIR/STOP exists (rank 0 looks; the file is
removed once honoured), finish the current step, agree across ranks, save a checkpoint, exit 124. With --train.resume=true it continues from `latest` and logs
"resumed from checkpoint <tag> at step <k>".
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 124


def parse(argv: list[str]) -> dict:
    cfg = {"run.dir": "runs/toy", "train.max_steps": "20", "train.checkpoint_every_steps": "0",
           "train.resume": "false", "toy.step_seconds": "0.1"}
    it = iter(argv)
    for a in it:
        if a == "--config":
            next(it)
            continue
        if a.startswith("--config="):
            continue
        if not a.startswith("--"):
            raise SystemExit(f"unexpected argument {a!r}")
        k, _, v = a[2:].partition("=")
        if not _:
            v = next(it)
        cfg[k] = v
    return cfg


def main() -> int:
    cfg = parse(sys.argv[1:])
    run_dir = Path(cfg["run.dir"])
    max_steps = int(cfg["train.max_steps"])
    every = int(cfg["train.checkpoint_every_steps"])
    resume = cfg["train.resume"].lower() in ("1", "true", "yes")
    step_seconds = float(cfg["toy.step_seconds"])

    stop = {"sig": 0}

    def on_signal(signum, _frame):
        stop["sig"] = signum
    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    log = (lambda *a: print(f"[toy rank0]", *a, flush=True)) if rank == 0 else (lambda *a: None)
    log(f"world_size={world} master={os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
        f"restart={os.environ.get('SLURM_RESTART_COUNT', '0')}")
    ckpt_dir = run_dir / "checkpoints"

    def save(step: int, value: float) -> None:
        tag = f"step_{step:08d}"
        if rank == 0:
            tmp = ckpt_dir / f".tmp-{tag}"
            tmp.mkdir(parents=True, exist_ok=True)
            torch.save({"step": step, "value": value}, tmp / "state.pt")
            final = ckpt_dir / tag
            if final.exists():
                for f in final.iterdir():
                    f.unlink()
                final.rmdir()
            tmp.rename(final)
            (ckpt_dir / ".latest.tmp").write_text(tag)
            (ckpt_dir / ".latest.tmp").rename(ckpt_dir / "latest")
            log(f"saved checkpoint {tag}")
        dist.barrier()

    step, value = 0, 0.0
    if resume and (ckpt_dir / "latest").exists():
        tag = (ckpt_dir / "latest").read_text().strip()
        state = torch.load(ckpt_dir / tag / "state.pt")
        step, value = state["step"], state["value"]
        log(f"resumed from checkpoint {tag} at step {step}")
    elif resume:
        log("resume requested but no checkpoint yet: starting at step 0")

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    metrics = None
    if rank == 0:  # as megafire.train.metrics: on resume, drop lines at or past the resume step
        mpath = run_dir / "metrics.jsonl"
        if mpath.exists():
            keep = [l for l in mpath.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
            mpath.write_text("".join(l + "\n" for l in keep))
        metrics = open(mpath, "a")
    saved_at = step
    while step < max_steps:
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        value += t.item()
        step += 1
        if metrics:
            metrics.write(json.dumps({"step": step, "loss": 10.0 / step, "value": value,
                                      "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))}) + "\n")
            metrics.flush()
        time.sleep(step_seconds)
        if every and step % every == 0:
            save(step, value)
            saved_at = step
        by_file = rank == 0 and (run_dir / "STOP").exists()
        flag = torch.tensor([float(stop["sig"]), float(by_file)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.max().item() and step < max_steps:
            if saved_at != step:
                save(step, value)
            if rank == 0:
                (run_dir / "STOP").unlink(missing_ok=True)
            how = f"signal {int(flag[0].item())}" if flag[0].item() else "stop file"
            log(f"{how} received: checkpoint at step {step}, exiting {EXIT_PREEMPTED}")
            dist.destroy_process_group()
            return EXIT_PREEMPTED
    if saved_at != step:
        save(step, value)
    expected = step * world * (world + 1) / 2
    log(f"training complete at step {step} value={value} expected={expected}")
    dist.destroy_process_group()
    return 0 if value == expected else 3


if __name__ == "__main__":
    sys.exit(main())
