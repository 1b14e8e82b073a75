"""End-to-end tests on a real (local, single-node) Slurm cluster: ci/slurm_up.sh.

A 2-task gloo training job through slurm/train-cpu.sbatch completes; a job requeued while
running (externally, and by its own SIGUSR1 trap before the time limit) resumes from its
checkpoint under the same job id and completes.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slurm

RESUMED = re.compile(r"resumed from .*?step[_ =]*0*(\d+)", re.I)


def read_metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def assert_metrics_complete(run_dir: Path, steps: int):
    steps_seen = [m["step"] for m in read_metrics(run_dir)]
    assert steps_seen == list(range(1, steps + 1)), f"metrics steps {steps_seen}"


def latest_step(run_dir: Path) -> int:
    p = run_dir / "checkpoints" / "latest"
    if not p.exists():
        return 0
    m = re.search(r"(\d+)", p.read_text())
    return int(m.group(1)) if m else 0


def test_scontrol_hostnames_agree_with_parser(slurm_cluster):
    import slurm_env   # loaded by test_slurm_env.py's importer or here
    for hl in ["node[01-03,07]", "a,b[1-2]", "r[1-2]-n[1-2]", "localhost"]:
        out = subprocess.run(["scontrol", "show", "hostnames", hl], capture_output=True,
                             text=True, check=True).stdout.split()
        assert out == slurm_env.expand_hostlist(hl), hl


def test_two_task_job_completes(jobs, trainer, tmp_path):
    run_dir = tmp_path / "run"
    steps = 6
    job = jobs.submit("train-cpu.sbatch", "mf-basic", run_dir, trainer, trainer.args(steps, 3))
    jobs.wait(job, lambda s: s.get("JobState") == "COMPLETED", 150, "COMPLETED")
    rows = jobs.wait_sacct(job)
    log = jobs.log(job, "mf-basic")
    assert rows[-1]["State"] == "COMPLETED" and rows[-1]["ExitCode"] == "0:0", (rows, log)
    assert "restart 0" in log and "2 task(s)" in log, log
    assert_metrics_complete(run_dir, steps)
    assert latest_step(run_dir) == steps
    print("sacct:", rows)


def _wait_progress(jobs, job, run_dir, name, min_step):
    jobs.wait(job, lambda s: s.get("JobState") == "RUNNING", 60, "RUNNING")
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        if latest_step(run_dir) >= min_step:
            return latest_step(run_dir)
        st = jobs.state(job).get("JobState")
        assert st in ("RUNNING", "PENDING", "CONFIGURING"), f"job left RUNNING ({st}):\n{jobs.log(job, name)}"
        time.sleep(0.3)
    raise AssertionError(f"no checkpoint >= step {min_step} in time:\n{jobs.log(job, name)}")


def _check_resumed(jobs, job, name, run_dir, steps, ckpt_step):
    st = jobs.wait(job, lambda s: s.get("JobState") == "COMPLETED" and s.get("Restarts") == "1",
                   240, "COMPLETED after one restart")
    log = jobs.log(job, name)
    resumed = [int(k) for k in RESUMED.findall(log)]
    assert resumed and resumed[-1] >= ckpt_step > 0, f"no resume from step >= {ckpt_step}:\n{log}"
    assert "restart 1" in log and "--train.resume=true" in log, log
    assert_metrics_complete(run_dir, steps)
    rows = jobs.wait_sacct(job, duplicates=True)
    states = [r["State"] for r in rows]
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", rows
    assert rows[-1]["ExitCode"] == "0:0", rows
    print("sacct -D:", rows)
    return resumed[-1], st


def test_external_requeue_resumes_from_checkpoint(jobs, trainer, tmp_path):
    """`scontrol requeue` of a running job: it restarts under the same id and resumes."""
    run_dir, name, steps = tmp_path / "run", "mf-requeue", 40
    job = jobs.submit("train-cpu.sbatch", name, run_dir, trainer, trainer.args(steps, 4, slow=True))
    k = _wait_progress(jobs, job, run_dir, name, 4)
    assert k < steps, "job finished before it could be requeued: make it longer"
    subprocess.run(["scontrol", "requeue", job], check=True)
    # The requeued job waits out Slurm's credential window (AuthInfo=cred_expire, 5 s here).
    resumed, _ = _check_resumed(jobs, job, name, run_dir, steps, k)
    assert resumed >= k


def test_usr1_before_time_limit_checkpoints_and_requeues(jobs, trainer, tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@N sends before the time limit): the
    trap forwards it, the trainer checkpoints and exits 124, the script requeues the job."""
    run_dir, name, steps = tmp_path / "run", "mf-usr1", 40
    # Checkpoints only at the end: the resume point can only come from the signal checkpoint.
    job = jobs.submit("train-cpu.sbatch", name, run_dir, trainer, trainer.args(steps, 0, slow=True))
    jobs.wait(job, lambda s: s.get("JobState") == "RUNNING", 60, "RUNNING")
    deadline = time.monotonic() + 120
    while not read_metrics(run_dir) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert read_metrics(run_dir), f"no training progress:\n{jobs.log(job, name)}"
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    resumed, _ = _check_resumed(jobs, job, name, run_dir, steps, 1)
    log = jobs.log(job, name)
    assert "SIGUSR1 (time limit near)" in log and "scontrol requeue" in log, log
    assert "exit 124" in log, log
