"""End-to-end tests on a real (local, single-node) Slurm cluster: ci/slurm_up.sh.

A 2-task gloo training job through slurm/train-cpu.sbatch completes; a job requeued while
running (from outside, then by its own SIGUSR1 trap before the time limit) resumes from its
checkpoint under the same job id each time and completes.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from slurm_testlib import ROOT, Trainer

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
    import slurm_env
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


def _wait_for(pred, timeout, what, jobs, job, name, poll=0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        st = jobs.state(job).get("JobState")
        assert st in ("RUNNING", "PENDING", "CONFIGURING", "COMPLETING", "REQUEUED"), \
            f"job {job} is {st} while waiting for {what}:\n{jobs.log(job, name)}"
        time.sleep(poll)
    raise AssertionError(f"job {job}: no {what} after {timeout}s:\n{jobs.log(job, name)}")


def test_requeue_and_time_limit_signal_resume(jobs, trainer, tmp_path):
    """One job, three runs under the same job id:
    run 1 is requeued from outside (`scontrol requeue`, as an admin or preemption would) once
    it has written a checkpoint; run 2 resumes from it, then gets SIGUSR1 on the batch shell
    (what `--signal=B:USR1@N` sends before the time limit): the trap writes RUN_DIR/STOP and
    forwards the signal, the trainer checkpoints and exits 124, the script requeues the job; run 3 resumes and completes."""
    # long enough that run 1 cannot finish inside Slurm's KillWait (30 s) after the external requeue,
    # even on an idle machine (~20 steps/s): the requeued step must be stopped, not outrun
    run_dir, name, steps, every = tmp_path / "run", "mf-requeue", 1200, 20
    job = jobs.submit("train-cpu.sbatch", name, run_dir, trainer, trainer.args(steps, every))
    log = lambda: jobs.log(job, name)

    # run 1: wait for a checkpoint, then requeue from outside
    k1 = _wait_for(lambda: latest_step(run_dir) >= every and latest_step(run_dir), 150,
                   "first checkpoint", jobs, job, name)
    assert k1 < steps, "the job finished before it could be requeued: make it longer"
    subprocess.run(["scontrol", "requeue", job], check=True)

    # run 2: resumed (after Slurm's requeue delay, AuthInfo=cred_expire) and training again
    def run2_training():
        r = [int(x) for x in RESUMED.findall(log())]
        return bool(r) and max((m["step"] for m in read_metrics(run_dir)), default=0) > r[-1] + 2
    _wait_for(run2_training, 150, "training after the first requeue", jobs, job, name)
    r1 = int(RESUMED.findall(log())[-1])
    assert r1 >= k1, f"run 2 resumed from step {r1} < checkpoint {k1}:\n{log()}"
    assert latest_step(run_dir) < steps, "the job finished before the signal: make it longer"
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)

    # run 3: resumed from the signal checkpoint and completed
    jobs.wait(job, lambda s: s.get("JobState") == "COMPLETED" and s.get("Restarts") == "2",
              240, "COMPLETED after two restarts")
    text = log()
    print(text)  # pytest shows it, line by line, under "Captured stdout" when an assert fails
    resumed = [int(k) for k in RESUMED.findall(text)]
    assert len(resumed) == 2 and 0 < resumed[0] < resumed[1] < steps, (resumed, text)
    assert "SIGUSR1 (time limit near)" in text and "scontrol requeue" in text, text
    assert "restart 2" in text and text.count("] resuming: ") == 2, text
    if trainer.name == "toy" or "exit 124" in text:
        assert "exit 124" in text, text
    else:
        warnings.warn("the trainer did not exit 124 after SIGUSR1 (slurm/README.md contract)")
    assert_metrics_complete(run_dir, steps)
    assert latest_step(run_dir) == steps
    rows = jobs.wait_sacct(job, duplicates=True)
    assert [r["State"] for r in rows] == ["REQUEUED", "REQUEUED", "COMPLETED"], rows
    assert rows[-1]["ExitCode"] == "0:0", rows
    print("sacct -D:", rows)


def _submit_torchrun_toy(jobs, name: str, run_dir: Path, steps: int, step_seconds: float) -> str:
    """The stand-in trainer under LAUNCHER=torchrun: one srun task on the node, 2 workers."""
    toy = Trainer("toy", str(ROOT / "tests/slurm/_toy_train.py"), extra=[f"--toy.step_seconds={step_seconds}"])
    return jobs.submit("train-cpu.sbatch", name, run_dir, toy, toy.args(steps, 0),
                       sbatch_opts=["--ntasks-per-node=1", "--cpus-per-task=2"],
                       env_extra={"LAUNCHER": "torchrun", "NPROC_PER_NODE": "2",
                                  "MEGAFIRE_PYTHON": sys.executable})


def test_torchrun_launcher_one_task_per_node(jobs, tmp_path):
    """LAUNCHER=torchrun: one srun task per node runs launch/torchrun.sh, which spawns 2
    processes with the master address/port derived from Slurm (stand-in trainer: fast)."""
    import slurm_env
    run_dir, name = tmp_path / "run", "mf-torchrun"
    job = _submit_torchrun_toy(jobs, name, run_dir, steps=4, step_seconds=0.01)
    jobs.wait(job, lambda s: s.get("JobState") == "COMPLETED", 120, "COMPLETED")
    log = jobs.log(job, name)
    assert "[launch/torchrun] node 0/1 x 2 procs" in log and "world_size=2" in log, log
    assert f"master=localhost:{slurm_env.master_port_for_job(job)}" in log, log
    assert_metrics_complete(run_dir, 4)


def test_torchrun_workers_stop_on_usr1_and_resume(jobs, tmp_path):
    """LAUNCHER=torchrun: the agent ignores SIGUSR1 (launch/torchrun.sh), so the batch shell's
    forward must reach the workers, its grandchildren: they checkpoint and stop, the job is
    requeued and the next run resumes from that checkpoint and completes."""
    run_dir, name, steps = tmp_path / "run", "mf-torchrun-usr1", 400  # 20 s of steps: not outrun
    job = _submit_torchrun_toy(jobs, name, run_dir, steps=steps, step_seconds=0.05)
    _wait_for(lambda: len(read_metrics(run_dir)) >= 3, 120, "training", jobs, job, name)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    jobs.wait(job, lambda s: s.get("JobState") == "COMPLETED" and s.get("Restarts") == "1",
              180, "COMPLETED after one restart")
    text = jobs.log(job, name)
    print(text)
    resumed = [int(k) for k in RESUMED.findall(text)]
    assert len(resumed) == 1 and 3 <= resumed[0] < steps, resumed
    assert "SIGUSR1 (time limit near)" in text and "restart 1" in text
    assert_metrics_complete(run_dir, steps)
