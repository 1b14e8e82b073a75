"""Real kills: SIGKILL at a random step and SIGKILL in the middle of a checkpoint write both
resume to the uninterrupted loss trace (bit-exact); SIGUSR1 checkpoints and exits with 124."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallel_testlib import REPO, clean_env, losses, tiny

HERE = Path(__file__).parent


def _env():
    import torch
    # same intra-op thread count as this process, so that the runs are bit-comparable
    return clean_env(OMP_NUM_THREADS=str(torch.get_num_threads()))


def _lines(run_dir: Path) -> int:
    f = run_dir / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.is_file() else 0


def _wait_for_lines(proc, run_dir: Path, n: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while _lines(run_dir) < n:
        assert proc.poll() is None, f"training ended early: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "training too slow"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from megafire.train.loop import train
    run = tmp_path_factory.mktemp("kill") / "full"
    train(tiny(run, "fire", max_steps=8, checkpoint_every_steps=1, keep_checkpoints=3))
    return losses(run)


def _resume(run_dir: Path) -> list[float]:
    from megafire.train.loop import train
    train(tiny(run_dir, "fire", max_steps=8, checkpoint_every_steps=1, keep_checkpoints=3, resume=True))
    return losses(run_dir)


def test_sigkill_at_random_step_resumes_to_same_trace(tmp_path, uninterrupted):
    seed = random.randrange(1 << 30)
    kill_at = random.Random(seed).randint(2, 6)
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(HERE / "_kill_driver.py"), str(run)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(proc, run, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    print(f"seed {seed}: killed after {kill_at} logged steps")
    assert _resume(run) == uninterrupted, f"seed {seed}, kill after step {kill_at}"


def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path, uninterrupted):
    from megafire.train import checkpoint as ckpt
    run = tmp_path / "killed-in-write"
    proc = subprocess.run([sys.executable, str(HERE / "_kill_driver.py"), str(run), "3"], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    root = run / "checkpoints"
    assert (root / ".tmp-step_00000003").is_dir()             # the write was cut short
    assert ckpt.latest_checkpoint(root).name == "step_00000002"  # the previous one is still current
    assert _resume(run) == uninterrupted


def test_sigusr1_checkpoints_and_exits_124(tmp_path):
    run = tmp_path / "signalled"
    cfg = tiny(run, "fire", max_steps=500)
    cfg.save(tmp_path / "cfg.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "megafire.cli", "train", "--config", str(tmp_path / "cfg.yaml")],
                            env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(proc, run, 2)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 124, err[-3000:]
    meta = json.loads(((run / "checkpoints") / (run / "checkpoints" / "latest").read_text().strip()
                       / "meta.json").read_text())
    assert meta["step"] == _lines(run) < 500


@pytest.mark.distributed
def test_stop_file_read_by_rank0_stops_every_rank_and_resumes_to_same_trace(tmp_path):
    """run.dir/STOP (what slurm/lib.sh writes before forwarding SIGUSR1) reaches rank 1 only
    through the stop agreement: both ranks checkpoint after the same step, the file is removed,
    and the resumed run continues the uninterrupted loss trace bit for bit."""
    from megafire.train import checkpoint as ckpt
    from parallel_testlib import failure_report, run_job
    layouts = ["dp2-z1", "pp2"]
    proc = run_job("_stop_file_job.py", 2, str(tmp_path), ",".join(layouts), timeout=600)
    assert proc.returncode == 0, failure_report(proc)
    for name in layouts:
        for rank in (0, 1):
            got = json.loads((tmp_path / f"{name}-rank{rank}.json").read_text())
            assert got == {"steps": 3, "stopped": True, "stop_file_left": False}, (name, rank, got)
        full, cut = losses(tmp_path / f"{name}-full"), losses(tmp_path / f"{name}-cut")
        assert len(full) == 6 and cut == full, f"{name}: resumed {cut} vs uninterrupted {full}"
        assert "stopping on request (file " in proc.stdout + proc.stderr


def test_stop_file_present_at_start_stops_after_the_first_step(tmp_path):
    """A request written before the run began (e.g. while it was queued) is honoured, not lost."""
    from megafire.train.loop import train
    run = tmp_path / "early"
    run.mkdir()
    (run / "STOP").touch()
    result = train(tiny(run, "nope", max_steps=5))
    assert (result.steps, result.stopped_by_signal, (run / "STOP").exists()) == (1, True, False)
    assert _lines(run) == 1
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"
