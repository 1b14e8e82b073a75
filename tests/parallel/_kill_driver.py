"""Kill drivers for test_parallel_kill.py.

``_kill_driver.py RUN_DIR [KILL_IN_WRITE_STEP]``: one training run (fire, 8 steps, a checkpoint
after each). With a step, the process SIGKILLs itself while writing that step's checkpoint:
after every file is in ``.tmp-step_*`` and before the rename that commits it (the worst moment).

``_kill_driver.py --write-faults PLAN.json``: kills at the k-th *point* of a checkpoint write.
The points of a write are the moments just before each file-system operation that
``megafire.train.checkpoint.save_checkpoint`` really does, DeepSpeed's included (read from
Python's audit events -- ``open`` for writing, ``os.mkdir``, ``os.rename`` (``os.replace``),
``os.remove``, ``os.rmdir``, ``os.chmod``, ``os.truncate`` -- plus wrappers of ``torch.save``,
whose C++ writer raises no event, and ``os.fsync``); after each file written, a point where
only a prefix of it is on disk (the file is cut to a seeded fraction of its length: a kill in
the middle of that write); and the moment the write has returned. The process imports torch,
DeepSpeed and megafire once and forks a child per run (imports cost ~5 s, a tiny run ~0.3 s):

1. a counting child trains the whole run and records the points of every checkpoint write;
2. per job, a child trains ``megafire train`` (the CLI's path) and SIGKILLs itself at point
   ``point`` of the write of checkpoint ``save_step``; the run directory is copied as it was
   left (``after-kill/``, for the test to inspect with megafire's readers);
3. a second child resumes it with ``--train.resume=true``.

PLAN.json: ``{"root": DIR, "parallel": {...}, "max_steps": N, "keep": K, "jobs": [JOB, ...]}``;
a JOB is ``{"save_step": S, "every_point": true, "seed": s}`` (one kill at each point of the
write of S, the cut of each partly written file drawn from ``Random(s * 1000 + point)``; with
``"points": [k, ...]`` instead of ``every_point``, at those points only: a replay) or
``{"random": n, "seed": s}`` (n kills, the written checkpoint, the point and the cut drawn from
``Random(s + i)``). Writes ``DIR/report.json``: one entry per kill.
The parent process runs no torch operation (forking after one started thread pools is unsafe).
"""
import json
import os
import random
import shutil
import signal
import sys
import traceback
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from parallel_testlib import tiny  # noqa: E402

#: audit events of operations that change the file system (``open`` only when it may write)
MUTATING_EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.chmod", "os.truncate", "os.link",
                   "os.symlink")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def main():
    if sys.argv[1] == "--write-faults":
        return write_faults(Path(sys.argv[2]))
    run_dir = sys.argv[1]
    kill_step = int(sys.argv[2]) if len(sys.argv) > 2 else None
    from megafire.train import checkpoint as ckpt
    from megafire.train.loop import train
    original = ckpt.save_checkpoint

    def save_checkpoint(*args, step, before_commit=None, **kwargs):
        if step == kill_step:
            before_commit = lambda tmp: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
        return original(*args, step=step, before_commit=before_commit, **kwargs)
    ckpt.save_checkpoint = save_checkpoint
    train(tiny(run_dir, "fire", max_steps=8, checkpoint_every_steps=1, keep_checkpoints=3))


# --- kills at the points of a checkpoint write -------------------------------------------------
class WritePoints:
    """Numbers the points of the write of checkpoint ``save_step`` (all of them: ``points``) and
    SIGKILLs this process at point ``kill_at`` (None: count only), leaving ``killed.json`` in
    ``report_dir`` to say where."""

    def __init__(self, root: Path, save_step=None, kill_at=None, cut=0.5, report_dir=None):
        self.root, self.save_step, self.kill_at, self.cut, self.report_dir = root, save_step, kill_at, cut, report_dir
        self.active = False
        self.points: dict[int, list[str]] = {}   # checkpoint step -> its points, in order
        self.step = None
        self.pending = None                       # a file written since the last point: its cut point is due

    def _name(self, path) -> str:
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)

    def _reach(self, what: str, cut_file=None) -> None:
        points = self.points.setdefault(self.step, [])
        k = len(points)
        points.append(what)
        if self.step != self.save_step or k != self.kill_at:
            return
        self.active = False
        killed = {"point": k, "what": what}
        if cut_file is not None and os.path.isfile(cut_file):
            size = os.path.getsize(cut_file)
            os.truncate(cut_file, int(size * self.cut))
            killed["kept_bytes"] = [int(size * self.cut), size]
        Path(self.report_dir, "killed.json").write_text(json.dumps(killed))
        os.kill(os.getpid(), signal.SIGKILL)

    def _flush_pending(self) -> None:
        if self.pending is not None:
            path, self.pending = self.pending, None
            self._reach(f"{self._name(path)} partly written", cut_file=path)

    def before(self, what: str) -> None:
        if self.active:
            self._flush_pending()
            self._reach(f"before {what}")

    def wrote(self, path) -> None:
        if self.active:
            self.pending = path

    def audit(self, event: str, args) -> None:
        if not self.active:
            return
        if event == "open":
            path, _mode, flags = args
            if isinstance(path, (str, bytes, os.PathLike)) and flags & WRITE_FLAGS:
                self.before(f"open({self._name(path)!r}) for writing")
                self.wrote(path)
        elif event in MUTATING_EVENTS:
            paths = [self._name(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            self.before(f"{event}({', '.join(paths)})")

    def install(self) -> None:
        """Audit hook, torch.save / os.fsync wrappers, and the window: one save_checkpoint call."""
        import torch

        from megafire.train import checkpoint as ckpt
        sys.addaudithook(self.audit)
        real_save, real_fsync, real_write = torch.save, os.fsync, ckpt.save_checkpoint

        def save(obj, f, *args, **kwargs):
            self.before(f"torch.save(-> {self._name(f)})")
            result = real_save(obj, f, *args, **kwargs)
            self.wrote(f)
            return result

        def fsync(fd):
            link = f"/proc/self/fd/{fd}"
            self.before(f"os.fsync({self._name(os.readlink(link)) if os.path.islink(link) else fd})")
            return real_fsync(fd)

        def save_checkpoint(*args, step, **kwargs):
            self.step, self.active = step, True
            result = real_write(*args, step=step, **kwargs)
            self._flush_pending()
            self._reach("after save_checkpoint returned")
            self.active = False
            return result
        torch.save, os.fsync, ckpt.save_checkpoint = save, fsync, save_checkpoint


def _in_child(log: Path, body) -> int:
    """Run ``body()`` in a forked child (stdout and stderr to ``log``); its wait status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = int(body() or 0)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def _megafire_train(config: Path, *overrides: str) -> int:
    from megafire.cli import main
    return main(["train", "--config", str(config), *overrides])


def _preload() -> None:
    """Import what a training run imports, so that each forked child does not (no torch op runs)."""
    import importlib
    for name in ("deepspeed", "deepspeed.runtime.engine", "megatron.core.tensor_parallel", "mlflow",
                 "megafire.cli", "megafire.train.cli", "megafire.train.loop", "megafire.train.engine",
                 "megafire.train.components", "megafire.tracking", "megafire.model", "megafire.parallel",
                 "megafire.parallel.pipeline", "megafire.positional.registry", "megafire.positional.fire",
                 "megafire.attention.dispatch", "megafire.train.universal"):
        importlib.import_module(name)


def write_faults(plan_path: Path) -> None:
    plan = json.loads(plan_path.read_text())
    _preload()
    root = Path(plan["root"])

    def config(job_dir: Path) -> Path:
        job_dir.mkdir(parents=True)
        cfg = tiny(job_dir / "run", "fire", parallel=plan.get("parallel"), max_steps=plan["max_steps"],
                   checkpoint_every_steps=1, keep_checkpoints=plan["keep"])
        cfg.save(job_dir / "config.yaml")
        return job_dir / "config.yaml"

    counting = WritePoints(root / "count" / "run" / "checkpoints")
    count_cfg = config(root / "count")

    def count():
        counting.install()
        code = _megafire_train(count_cfg)
        (root / "count" / "points.json").write_text(json.dumps(counting.points))
        return code
    assert _in_child(root / "count" / "train.log", count) == 0, (root / "count" / "train.log").read_text()[-3000:]
    points = {int(k): v for k, v in json.loads((root / "count" / "points.json").read_text()).items()}

    kills = []
    for job in plan["jobs"]:
        if job.get("every_point") or "points" in job:
            chosen = job.get("points") or range(len(points[job["save_step"]]))
            kills += [(job["save_step"], k, random.Random(job["seed"] * 1000 + k).random(), job["seed"])
                      for k in chosen]
        else:
            for i in range(job["random"]):
                rng = random.Random(job["seed"] + i)
                step = rng.randint(1, plan["max_steps"])
                kills.append((step, rng.randrange(len(points[step])), rng.random(), job["seed"] + i))
    report = []
    for n, (step, point, cut, seed) in enumerate(kills):
        job_dir = root / f"{n:04d}-step{step}-point{point}"
        cfg = config(job_dir)
        writer = WritePoints(job_dir / "run" / "checkpoints", step, point, cut, job_dir)

        def killed_run():
            writer.install()
            return _megafire_train(cfg)
        status = _in_child(job_dir / "train.log", killed_run)
        killed = job_dir / "killed.json"
        entry = {"dir": str(job_dir), "seed": seed, "save_step": step, "point": point, "cut": cut,
                 "num_points": len(points[step]), "expected": points[step][point],
                 "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                 "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                 "killed_at": json.loads(killed.read_text()) if killed.is_file() else None}
        if (job_dir / "run").exists():
            shutil.copytree(job_dir / "run", job_dir / "after-kill", symlinks=True)
        status = _in_child(job_dir / "resume.log", lambda: _megafire_train(cfg, "--train.resume=true"))
        entry["resume_exit_code"] = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        report.append(entry)
    (root / "report.json").write_text(json.dumps({"points": points, "kills": report}, indent=1))


if __name__ == "__main__":
    main()
