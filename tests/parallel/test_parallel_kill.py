"""Real kills: SIGKILL at a random step and SIGKILL in the middle of a checkpoint write both
resume to the uninterrupted loss trace (bit-exact); a SIGKILL at every point of a checkpoint
write (each file-system operation it does, each file half written: _kill_driver.py) leaves
`latest` naming a complete checkpoint and no partial one under a checkpoint's name;
SIGUSR1 checkpoints and exits with 124."""
from __future__ import annotations

import json
import os
import random
import re
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


# --- a kill at every point of a checkpoint write ------------------------------------------------
COMMITTED = re.compile(r"^step_\d{8}$")


def _write_faults(tmp_path: Path, jobs: list[dict], parallel: dict | None = None, timeout: int = 800) -> dict:
    """``_kill_driver.py --write-faults`` (its docstring: the points, the jobs, the report) with the
    settings of the ``uninterrupted`` fixture: fire, 8 steps, a checkpoint after each, 3 kept."""
    plan = {"root": str(tmp_path), "parallel": parallel or {}, "max_steps": 8, "keep": 3, "jobs": jobs}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    cmd = [sys.executable, str(HERE / "_kill_driver.py"), "--write-faults", str(tmp_path / "plan.json")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "report.json").read_text())


def _assert_sound_after_kill(kill: dict, reference: list[float], capsys, seed: int) -> None:
    """After a kill in the write of checkpoint S: `latest` is whole and names checkpoint S-1 or S,
    which resume's check and the readers' check (eval, export, universal, --init-from) accept
    without a warning; every directory under a checkpoint's name is complete (the others are
    temporaries); `megafire train --train.resume=true` continues the uninterrupted trace."""
    from megafire.train import checkpoint as ckpt
    step = kill["save_step"]
    where = (f"killed in the write of checkpoint {step} at point {kill['point']} of {kill['num_points']} "
             f"({kill['expected']}); see {kill['dir']}; replay: MEGAFIRE_KILL_SEED={seed}")
    assert kill["signal"] == signal.SIGKILL, where
    killed_at = kill["killed_at"] or {}
    assert (killed_at.get("point"), killed_at.get("what")) == (kill["point"], kill["expected"]), where   # as counted
    run = Path(kill["dir"]) / "after-kill"
    root = run / "checkpoints"
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    committed = [n for n in names if COMMITTED.match(n)]
    assert all(n in committed or n == ckpt.LATEST or n.startswith(ckpt.TMP_PREFIX) for n in names), (where, names)
    for name in committed:
        try:
            ckpt.verify_checkpoint(root / name)
        except ckpt.CheckpointError as e:
            pytest.fail(f"{where}: a partial directory is named {name}: {e}")
    if (root / ckpt.LATEST).exists():
        text = (root / ckpt.LATEST).read_text()
        assert text in (f"{ckpt.checkpoint_name(step - 1)}\n", f"{ckpt.checkpoint_name(step)}\n"), (where, text)
        named = root / text.strip()
    else:   # the first write, before its pointer existed: readers take the newest complete checkpoint
        assert step == 1 and committed in ([], ["step_00000001"]), (where, names)
        named = root / committed[0] if committed else None
    if named is not None:
        assert ckpt.find_checkpoint(root, fallback=False) == named, where      # resume: every file of every rank
        assert ckpt.resolve_for_reading(run) == named, where                   # eval, export, universal, --init-from
        assert "warning" not in capsys.readouterr().err, where
    resume_log = (Path(kill["dir"]) / "resume.log").read_text()
    assert kill["resume_exit_code"] == 0, f"{where}\n{resume_log[-3000:]}"
    assert "skipping damaged" not in resume_log, where
    assert losses(Path(kill["dir"]) / "run") == reference, where
    after = Path(kill["dir"]) / "run" / "checkpoints"
    assert (after / ckpt.LATEST).read_text() == "step_00000008\n", where
    assert not [p.name for p in after.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)], where


def _kill_seed() -> int:
    """A fresh seed per run (MEGAFIRE_KILL_SEED replays one: failures print theirs)."""
    return int(os.environ.get("MEGAFIRE_KILL_SEED") or random.randrange(1 << 30))


def test_sigkill_at_every_point_of_a_checkpoint_write(tmp_path, uninterrupted, capsys):
    """One kill at each point of the write of checkpoint 4 (which also prunes checkpoint 1), the
    cut of each partly written file drawn from the seed; and a few kills at random points of
    random writes (the first, with no checkpoint yet, and the last included over many runs)."""
    seed = _kill_seed()
    report = _write_faults(tmp_path, [{"save_step": 4, "every_point": True, "seed": seed},
                                      {"random": 6, "seed": seed}])
    points, kills = report["points"]["4"], report["kills"]
    assert sorted(k["point"] for k in kills[:len(points)]) == list(range(len(points)))
    for kill in kills:
        _assert_sound_after_kill(kill, uninterrupted, capsys, seed)
    # the points are the write's real operations: DeepSpeed's file, ours, the commit, the pointer, the prune
    for op in ("before torch.save(-> .tmp-step_00000004/ds/mp_rank_00_model_states.pt)",
               ".tmp-step_00000004/meta.json partly written", "before os.rename(.tmp-step_00000004, step_00000004)",
               ".tmp-latest partly written", "before os.fsync(", "before os.rename(.tmp-latest, latest)",
               "before os.remove(mp_rank_00_model_states.pt)", "after save_checkpoint returned"):
        assert any(p.startswith(op) for p in points), (op, points)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_sigkill_at_every_point_of_every_checkpoint_write(tmp_path, zero_stage, capsys):
    """Exhaustive: each point of each of the 8 writes, ZeRO-0 and ZeRO-1 (optimizer shards and
    DeepSpeed's recovery scripts), plus 40 random kills."""
    from megafire.train.loop import train
    train(tiny(tmp_path / "full", "fire", parallel={"zero_stage": zero_stage}, max_steps=8, checkpoint_every_steps=1,
               keep_checkpoints=3))
    reference = losses(tmp_path / "full")
    seed = _kill_seed()
    report = _write_faults(tmp_path / "kills", [{"save_step": s, "every_point": True, "seed": seed + s}
                                                for s in range(1, 9)] + [{"random": 40, "seed": seed}],
                           parallel={"zero_stage": zero_stage}, timeout=1700)
    if zero_stage:
        assert any("zero_pp_rank_0_mp_rank_00_optim_states.pt" in p for p in report["points"]["4"])
    covered = {(k["save_step"], k["point"]) for k in report["kills"]}
    assert covered >= {(int(s), k) for s, points in report["points"].items() for k in range(len(points))}
    for kill in report["kills"]:
        _assert_sound_after_kill(kill, reference, capsys, seed)
