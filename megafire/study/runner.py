"""Training and evaluating every job of a plan: subprocesses, several at once, resumable.

Each job (arm, seed) is trained by ``python -m megafire.cli train`` in its own process (the
GPU is shared by ``concurrency`` processes; CUDA_VISIBLE_DEVICES is left as it is), then
evaluated by ``python -m megafire.cli study eval-run`` in another. What is done is never
redone: a run whose ``train_done.json`` matches the requested steps is not retrained (a run
with a checkpoint short of them resumes, one without any restarts clean), and a run whose
``eval/study_eval.json`` has the plan's evaluation settings is not re-evaluated. Progress
goes to ``OUT/progress.log`` (one timestamped line per event). One runner per OUT at a time
(an flock on ``OUT/.runner.lock``).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from .evaluate import RESULT
from .plan import Job, Plan

TRAIN_DONE = "train_done.json"
LOCK = ".runner.lock"


def log_progress(out: Path, message: str) -> None:
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {message}"
    print(f"[study] {line}", flush=True)
    with open(out / "progress.log", "a") as f:
        f.write(line + "\n")


class RunnerLock:
    """Exclusive, non-blocking: ``acquire()`` is False while another runner holds OUT."""

    def __init__(self, out: Path):
        self.path, self.fd = out / LOCK, None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def runner_active(out: Path) -> bool:
    lock = RunnerLock(out)
    if lock.acquire():
        lock.release()
        return False
    return True


def ensure_shards(plan: Plan) -> None:
    """Unpack ``data.shards_archive`` into ``data.shards_dir`` when the shards are missing."""
    shards = plan.data.shards_dir
    if (shards / "manifest.json").is_file():
        return
    archive = plan.data.shards_archive
    if archive is None or not archive.is_file():
        raise FileNotFoundError(f"no shards at {shards} and no archive {archive} to unpack them from: "
                                f"build them with data_prep/build_study_data.py")
    root = shards.parent
    tmp = root.with_name(root.name + f".unpack{os.getpid()}")
    with tarfile.open(archive) as tf:
        tf.extractall(tmp, filter="data")
    src = tmp / shards.name
    if not (src / "manifest.json").is_file():
        raise FileNotFoundError(f"{archive} holds no {shards.name}/manifest.json")
    shards.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, shards)
    shutil.rmtree(tmp, ignore_errors=True)


def arm_steps(job: Job, tokens: int, extra: list[str] = ()) -> tuple[int, int, int]:
    """(max_steps, tokens_per_step, train length) for a token budget (rounded down to whole steps)."""
    from megafire.config import load_config
    cfg = load_config(job.arm.config, list(extra))
    steps = max(1, tokens // cfg.train.tokens_per_step)
    return steps, cfg.train.tokens_per_step, cfg.train_length


def train_overrides(plan: Plan, job: Job, tokens: int, extra: list[str]) -> list[str]:
    steps, per_step, length = arm_steps(job, tokens, extra)
    return [f"--run.dir={job.run_dir}", f"--run.name=study-{job.name}", f"--train.seed={job.seed}",
            f"--train.max_steps={steps}", f"--curriculum.stages=[{{seq_len: {length}, tokens: {steps * per_step}}}]",
            f"--data.tokenizer_dir={plan.data.tokenizer_dir}", f"--data.shards_dir={plan.data.shards_dir}",
            "--tracking.enabled=false", "--train.progress=false", *extra]


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def trained(job: Job, steps: int) -> bool:
    done = _read_json(job.run_dir / TRAIN_DONE)
    return bool(done) and done.get("rc") == 0 and done.get("max_steps") == steps


def evaluated(job: Job, plan: Plan) -> bool:
    res = _read_json(job.run_dir / "eval" / RESULT)
    if not res or res.get("settings") != plan.eval.settings():
        return False
    wanted = set(job.arm.scalings) if res.get("encoding") == "rope" else {"none"}
    return set(res.get("perplexity", {})) >= wanted


def _env(threads: Optional[int]) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def train_job(plan: Plan, job: Job, out: Path, tokens: int, extra: list[str], threads: Optional[int]) -> int:
    """Train one job (``tokens``: the plan's budget; the arm's own ``tokens`` wins, plan.Arm.budget)."""
    from megafire.train.load import latest_step
    tokens = job.arm.budget(tokens)
    steps, per_step, _ = arm_steps(job, tokens, extra)
    if trained(job, steps):
        log_progress(out, f"{job.name} train: done before, skipped")
        return 0
    args = train_overrides(plan, job, tokens, extra)
    done_steps = latest_step(job.run_dir) if (job.run_dir / "checkpoints").is_dir() else None
    if done_steps is not None and done_steps < steps:
        args.append("--train.resume=true")
        log_progress(out, f"{job.name} train: resuming from step {done_steps}")
    elif job.run_dir.exists():
        shutil.rmtree(job.run_dir)                  # a run killed before its only checkpoint: start clean
    job.run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "megafire.cli", "train", "--config", str(job.arm.config), *args]
    log_progress(out, f"{job.name} train: start ({steps} steps, {steps * per_step:,} tokens)")
    t0 = time.time()
    with open(job.run_dir / "train.log", "a") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(threads))
    seconds = time.time() - t0
    record = {"rc": rc, "max_steps": steps, "tokens": steps * per_step, "seconds": round(seconds, 1),
              "concurrency": plan.concurrency, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (job.run_dir / TRAIN_DONE).write_text(json.dumps(record) + "\n")
    log_progress(out, f"{job.name} train: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {seconds:.0f}s")
    return rc


def eval_job(plan: Plan, job: Job, out: Path, device: str, threads: Optional[int]) -> int:
    if evaluated(job, plan):
        log_progress(out, f"{job.name} eval: done before, skipped")
        return 0
    cmd = [sys.executable, "-m", "megafire.cli", "study", "eval-run", "--plan", str(plan.path),
           "--data-root", str(plan.data_root), "--run-dir", str(job.run_dir),
           "--scalings", ",".join(job.arm.scalings), "--device", device]
    log_progress(out, f"{job.name} eval: start")
    t0 = time.time()
    with open(job.run_dir / "eval.log", "a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(threads))
    log_progress(out, f"{job.name} eval: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {time.time() - t0:.0f}s")
    return rc


def run_jobs(plan: Plan, jobs: list[Job], out: Path, *, tokens: int, concurrency: int, device: str,
             extra: list[str], skip_eval: bool = False) -> dict[str, str]:
    """Train then evaluate every job, ``concurrency`` pipelines at once -> {job: "ok" | failure}."""
    ensure_shards(plan)
    threads = None if device.startswith("cuda") else max(1, (os.cpu_count() or 1) // max(1, concurrency))

    def pipeline(job: Job) -> tuple[str, str]:
        if train_job(plan, job, out, tokens, extra, threads) != 0:
            return job.name, "train failed"
        if not skip_eval and eval_job(plan, job, out, device, threads) != 0:
            return job.name, "eval failed"
        return job.name, "ok"
    with ThreadPoolExecutor(max(1, min(concurrency, len(jobs)))) as pool:
        return dict(pool.map(pipeline, jobs))


EXPORT = "study_results.tar.gz"


def export_results(out: Path, export_dir: Path) -> Path:
    """Evaluation outputs, metrics, configs and logs of every run (no checkpoints) + the study
    files, as ``export_dir/study_results.tar.gz`` (what ``megafire study report --from-tarball``
    reads); study.json/md/png are also copied next to it."""
    export_dir.mkdir(parents=True, exist_ok=True)
    keep = ("config.yaml", "metrics.jsonl", TRAIN_DONE, "train.log", "eval.log")
    files = [p for p in sorted(out.glob("*")) if p.is_file() and not p.name.startswith(".")
             and p.suffix in (".json", ".md", ".png", ".log", ".yaml")]
    for run in sorted((out / "runs").glob("*")):
        files += [run / k for k in keep if (run / k).is_file()]
        files += sorted(p for p in (run / "eval").rglob("*") if p.is_file() and p.suffix in (".json", ".png"))
    target = export_dir / EXPORT
    tmp = target.with_name(target.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tf:
        for p in files:
            tf.add(p, arcname=str(p.relative_to(out)))
    tmp.replace(target)
    for name in ("study.json", "study.md", "study.png"):
        if (out / name).is_file():
            shutil.copy2(out / name, export_dir / name)
    return target
