"""Helpers of the real-Slurm tests (unique module name: imported by conftest.py and tests).

Tests marked ``slurm`` skip when Slurm is not reachable (no ``sinfo`` or it fails, or no
node is usable), unless MEGAFIRE_REQUIRE_SLURM=1, which turns the skip into a failure (CI).
MEGAFIRE_SLURM_TRAINER=toy|megafire picks the trainer the jobs run (default: the real
`megafire train` when it imports, else the stand-in tests/slurm/_toy_train.py).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launch"))   # launch/slurm_env.py: `import slurm_env`


def _slurm_problem() -> str | None:
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return "Slurm client commands not installed (run ci/slurm_up.sh)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed: {e}"
    if r.returncode != 0:
        return f"sinfo failed: {r.stderr.strip()[:200]} (run ci/slurm_up.sh)"
    if not re.search(r"^(idle|mixed|allocated|completing)", r.stdout, re.M):
        return f"no usable Slurm node (sinfo: {r.stdout.split()})"
    return None


def _megafire_train_available() -> bool:
    r = subprocess.run([sys.executable, "-c", "import megafire.train.cli"], capture_output=True,
                       cwd=ROOT)
    return r.returncode == 0


@dataclass
class Trainer:
    """How the sbatch template runs the trainer: TRAIN_CMD, CONFIG and per-test overrides."""
    name: str
    cmd: str
    config: str = ""
    extra: list = field(default_factory=list)

    def args(self, steps: int, ckpt_every: int) -> list[str]:
        return [f"--train.max_steps={steps}", f"--train.checkpoint_every_steps={ckpt_every}",
                *self.extra]


# The real trainer on synthetic data with a tiny model: ~30 ms a step on 2 CPU cores, so a
# job's time is mostly start-up (imports, DeepSpeed); the tests exercise Slurm, not the model.
MEGAFIRE_TINY = ["--data.corpus=synthetic", "--model.vocab_size=256", "--model.hidden_size=64",
                 "--model.num_layers=2", "--model.num_heads=2", "--data.seq_len=64",
                 "--train.tokens_per_step=256", "--train.keep_checkpoints=2",
                 "--tracking.enabled=false", "--train.progress=false"]


class Jobs:
    """Submits the sbatch templates, waits with bounded timeouts, cancels leftovers."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.ids: list[str] = []

    def submit(self, template: str, name: str, run_dir: Path, trainer: Trainer, args: list[str],
               sbatch_opts: list[str] = (), env_extra: dict | None = None) -> str:
        env = dict(os.environ)
        env.update(MEGAFIRE_ROOT=str(ROOT), RUN_DIR=str(run_dir), TRAIN_CMD=trainer.cmd,
                   CONFIG=trainer.config, PYTHONUNBUFFERED="1")
        env.update(env_extra or {})
        # a rendezvous left in this process's environment (an in-process world) must not leak
        # into the job: slurm_env.py honours an explicit MASTER_ADDR/MASTER_PORT
        for var in ("SLURM_JOB_ID", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(var, None)
        cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--output={self.tmp}/%x-%j.out",
               "--export=ALL", *sbatch_opts, str(ROOT / "slurm" / template), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
        assert r.returncode == 0, f"sbatch failed: {r.stderr}"
        job = r.stdout.strip().split(";")[0]
        self.ids.append(job)
        return job

    def log(self, job: str, name: str) -> str:
        p = self.tmp / f"{name}-{job}.out"
        return p.read_text(errors="replace") if p.exists() else ""

    @staticmethod
    def state(job: str) -> dict:
        r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
        if r.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def wait(self, job: str, until, timeout: float, what: str, poll: float = 0.5) -> dict:
        deadline = time.monotonic() + timeout
        st = {}
        while time.monotonic() < deadline:
            st = self.state(job)
            if until(st):
                return st
            if st.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                break
            time.sleep(poll)
        raise AssertionError(f"job {job}: timed out or ended waiting for {what}; "
                             f"state {st.get('JobState')} reason {st.get('Reason')}\n"
                             f"--- log ---\n{self._all_logs(job)}")

    def _all_logs(self, job: str) -> str:
        return "\n".join(p.read_text(errors="replace")[-6000:] for p in self.tmp.glob(f"*-{job}.out"))

    @staticmethod
    def sacct(job: str, duplicates: bool = False) -> list[dict]:
        cmd = ["sacct", "-j", job, "-n", "-P", "-X", "-o", "JobID,JobName,State,ExitCode,Elapsed"]
        if duplicates:
            cmd.insert(1, "-D")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        keys = ["JobID", "JobName", "State", "ExitCode", "Elapsed"]
        return [dict(zip(keys, line.split("|"))) for line in r.stdout.splitlines() if line.strip()]

    def wait_sacct(self, job: str, timeout: float = 30, duplicates: bool = False) -> list[dict]:
        """Accounting reaches slurmdbd asynchronously: poll until the last record is final."""
        deadline = time.monotonic() + timeout
        rows = []
        while time.monotonic() < deadline:
            rows = self.sacct(job, duplicates)
            if rows and rows[-1]["State"] not in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING"):
                return rows
            time.sleep(0.5)
        raise AssertionError(f"sacct for job {job} not final after {timeout}s: {rows}")

    def cancel_all(self):
        if self.ids:
            subprocess.run(["scancel", *self.ids], capture_output=True)
