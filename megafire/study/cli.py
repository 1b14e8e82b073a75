"""``megafire study {run, report, status, eval-run}``: the length-generalization study (issue 14).

    megafire study run --plan configs/study/plan.yaml --out study_out [--tokens N] [--concurrency K]
                       [--arms a,b] [--seeds 1234,1235] [--device cuda] [--export-dir DIR]
                       [--detach --wait SECONDS] [-- --section.key=value ...]
    megafire study report --out study_out [--from-tarball study_results.tar.gz]
                          [--tracking-uri URI | --no-tracking] [--experiment megafire-study]
    megafire study status --out study_out

``run`` trains every (arm, seed) of the plan as its own ``megafire train`` process,
``--concurrency`` at a time on the one GPU, evaluates each finished run (perplexity at
1x..16x the training length on the held-out prose and code, rope also with position
interpolation and YaRN, passkey at 1x..8x), then writes ``OUT/study.{json,md,png}`` and,
with ``--export-dir``, packs every run's evaluation outputs, metrics.jsonl, config and logs
(no checkpoints) into ``EXPORT_DIR/study_results.tar.gz``. It is resumable: finished training
and evaluation are skipped, so the same command can be repeated until it reports all done.
``--detach`` starts the runner in its own session (it survives the calling shell) unless one
is already running on OUT, follows ``OUT/progress.log`` for up to ``--wait`` seconds, then
exports what exists; exit status 0 = study complete, 3 = still running, 1 = a job failed.

Training runs with tracking off (the GPU machine has no mlflow); ``report`` logs the study
afterwards wherever mlflow is installed, from the run directories or from the exported
tarball: one MLflow run per (arm, seed) in one experiment, with params (the run's resolved
config), the metrics trace of metrics.jsonl, the evaluation numbers and the plot.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

DEFAULT_PLAN = "configs/study/plan.yaml"


def _list(text: str | None, cast=str):
    return [cast(x.strip()) for x in text.split(",") if x.strip()] if text else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megafire study", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    run = sub.add_parser("run", help="train and evaluate every arm of the plan, then write the report")
    run.add_argument("--plan", default=DEFAULT_PLAN)
    run.add_argument("--out", default="study_out")
    run.add_argument("--data-root", default=".", help="directory the plan's data paths are relative to")
    run.add_argument("--tokens", type=int, help="training tokens per run (default: the plan's)")
    run.add_argument("--concurrency", type=int, help="runs at once (default: the plan's)")
    run.add_argument("--arms", help="comma-separated subset of the plan's arms")
    run.add_argument("--seeds", help="comma-separated seeds for every selected arm (default: the plan's)")
    run.add_argument("--device", default=None, help="evaluation device (default: cuda if available)")
    run.add_argument("--shards-dir", default=None,
                     help="where the training shards are (unpacked from the plan's archive when missing); "
                          "default: the plan's data.shards_dir. Put it outside a directory that is re-synced "
                          "while the runner works (a lent GPU machine's copy of the checkout)")
    run.add_argument("--skip-eval", action="store_true", help="train only")
    run.add_argument("--export-dir", help="write study_results.tar.gz (+ study.json/md/png) here")
    run.add_argument("--detach", action="store_true", help="run in the background; follow it for --wait s")
    run.add_argument("--wait", type=float, default=0.0, help="with --detach: seconds to follow the runner")
    run.add_argument("overrides", nargs="*", help="--section.key=value overrides for every training run (after --)")
    rep = sub.add_parser("report", help="rebuild study.json/md/png from the runs and log them to MLflow")
    rep.add_argument("--out", default="study_out")
    rep.add_argument("--from-tarball", help="a study_results.tar.gz of `study run --export-dir`: unpacked into --out")
    rep.add_argument("--plan", default=None, help="plan (for the arms' ablation notes); default: as recorded")
    rep.add_argument("--tracking-uri", default="", help="MLflow store (default: sqlite:///OUT/mlflow.db)")
    rep.add_argument("--experiment", default="megafire-study")
    rep.add_argument("--no-tracking", action="store_true")
    rep.add_argument("--publish", help="also copy study.json/md/png into this directory (e.g. docs)")
    rep.add_argument("--reading", help="a Markdown file with the reading of the numbers, put under study.md's "
                                       "'Reading' (e.g. docs/study_reading.md)")
    st = sub.add_parser("status", help="progress of a study: jobs done, the log's last lines")
    st.add_argument("--out", default="study_out")
    ev = sub.add_parser("eval-run", help="(internal) evaluate one finished run of the plan")
    ev.add_argument("--plan", default=DEFAULT_PLAN)
    ev.add_argument("--data-root", default=".")
    ev.add_argument("--run-dir", required=True)
    ev.add_argument("--scalings", default="none")
    ev.add_argument("--device", default=None)
    return p


def _device(arg: str | None) -> str:
    if arg:
        return arg
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def plan_arms_summary(plan) -> dict:
    return {a.name: {"config": str(a.config.relative_to(plan.path.parent)) if a.config.is_relative_to(plan.path.parent)
                     else str(a.config), "seeds": a.seeds, "eval_scalings": a.scalings, "ablation": a.ablation}
            for a in plan.arms.values()}


def cmd_run(args) -> int:
    from .plan import load_plan, select_jobs
    from .report import write_report
    from .runner import RunnerLock, export_results, log_progress, run_jobs
    plan = load_plan(args.plan, args.data_root)
    if args.shards_dir:
        plan.data.shards_dir = Path(args.shards_dir).resolve()
    out = Path(args.out).resolve()
    if args.detach:
        return detach_and_follow(args, out)
    jobs = select_jobs(plan, out, _list(args.arms), _list(args.seeds, int))
    tokens = args.tokens or plan.tokens
    concurrency = args.concurrency or plan.concurrency
    plan.concurrency = concurrency
    lock = RunnerLock(out)
    if not lock.acquire():
        print(f"megafire study: another runner holds {out} (see {out / 'progress.log'})", file=sys.stderr)
        return 3
    try:
        log_progress(out, f"run: {len(jobs)} jobs, {tokens:,} tokens each, concurrency {concurrency}")
        status = run_jobs(plan, jobs, out, tokens=tokens, concurrency=concurrency, device=_device(args.device),
                          extra=list(args.overrides), skip_eval=args.skip_eval)
        failed = {k: v for k, v in status.items() if v != "ok"}
        if not args.skip_eval:
            try:
                write_report(out, plan_arms_summary(plan), plan.data.summary)
                log_progress(out, f"report: {out / 'study.json'}, study.md, study.png")
            except FileNotFoundError as e:
                log_progress(out, f"report: not written ({e})")
        if args.export_dir:
            log_progress(out, f"export: {export_results(out, Path(args.export_dir))}")
        log_progress(out, "run: all done" if not failed else f"run: FAILED {failed}")
        return 1 if failed else 0
    finally:
        lock.release()


def detach_and_follow(args, out: Path) -> int:
    """Start the runner in its own session unless one runs; follow progress.log; export."""
    from .runner import export_results, runner_active
    out.mkdir(parents=True, exist_ok=True)
    log = out / "progress.log"
    start = log.stat().st_size if log.is_file() else 0
    if not runner_active(out):
        cmd = [sys.executable, "-m", "megafire.cli", *_rebuild_argv(args)]
        with open(out / "runner.log", "a") as f:
            child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        print(f"[study] runner started (pid {child.pid}; log {out / 'runner.log'}): {' '.join(cmd)}", flush=True)
        while child.poll() is None and not runner_active(out):      # until it holds the lock
            time.sleep(0.5)
    else:
        print(f"[study] a runner is already working on {out}: following it", flush=True)
    deadline = time.time() + args.wait
    while True:
        start = _echo_new(log, start)
        if not runner_active(out) or time.time() >= deadline:
            break
        time.sleep(5)
    _echo_new(log, start)
    running = runner_active(out)
    if args.export_dir:
        if running:                # the runner exports at its end; meanwhile, what exists so far
            try:
                from .report import write_report
                write_report(out)
            except FileNotFoundError:
                pass
        print(f"[study] exported {export_results(out, Path(args.export_dir))}", flush=True)
    if running:
        print("[study] still running: repeat the command to follow it", flush=True)
        return 3
    text = log.read_text() if log.is_file() else ""
    last = [ln for ln in text.splitlines() if " run: " in ln][-1:] or [""]
    return 0 if last[0].endswith("all done") else 1


def _rebuild_argv(args) -> list[str]:
    argv = ["study", "run", "--plan", args.plan, "--out", args.out, "--data-root", args.data_root]
    for flag in ("tokens", "concurrency", "arms", "seeds", "device", "export_dir", "shards_dir"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    if args.skip_eval:
        argv.append("--skip-eval")
    if args.overrides:
        argv += ["--", *args.overrides]
    return argv


def _echo_new(log: Path, start: int) -> int:
    if not log.is_file():
        return start
    with open(log) as f:
        f.seek(start)
        chunk = f.read()
    if chunk:
        print(chunk, end="", flush=True)
    return start + len(chunk.encode())


def cmd_status(args) -> int:
    from .runner import runner_active
    out = Path(args.out).resolve()
    runs = sorted((out / "runs").glob("*-s*"))
    trained = [r.name for r in runs if (r / "train_done.json").is_file()]
    evaluated = [r.name for r in runs if (r / "eval" / "study_eval.json").is_file()]
    print(f"{out}: runner {'active' if runner_active(out) else 'idle'}; {len(runs)} run dirs, "
          f"{len(trained)} trained, {len(evaluated)} evaluated")
    log = out / "progress.log"
    if log.is_file():
        print("\n".join(log.read_text().splitlines()[-15:]))
    return 0


def cmd_eval_run(args) -> int:
    from .evaluate import evaluate_run
    from .plan import load_plan
    plan = load_plan(args.plan, args.data_root)
    res = evaluate_run(args.run_dir, plan, _list(args.scalings), _device(args.device))
    for scaling, by_set in res["perplexity"].items():
        for s, by_len in by_set.items():
            print(f"{res['run']:<18} {scaling:<6} {s:<6} " + "  ".join(f"{L}:{p:.2f}" for L, p in by_len.items()))
    return 0


def unpack_tarball(tarball: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tf:
        tf.extractall(out, filter="data")


def cmd_report(args) -> int:
    from .report import write_report
    out = Path(args.out).resolve()
    if args.from_tarball:
        unpack_tarball(Path(args.from_tarball), out)
    arms = None
    if args.plan:
        from .plan import load_plan
        arms = plan_arms_summary(load_plan(args.plan))
    reading = Path(args.reading) if args.reading else None
    if reading is not None and not reading.is_file():
        from megafire.config import MissingFileError
        raise MissingFileError(f"--reading {str(reading)!r} does not exist")
    report = write_report(out, arms, reading=reading)
    print(f"wrote {out / 'study.json'}, {out / 'study.md'}, {out / 'study.png'} ({len(report['runs'])} runs)")
    if args.publish:
        import shutil
        Path(args.publish).mkdir(parents=True, exist_ok=True)
        for name in ("study.json", "study.md", "study.png"):
            shutil.copy2(out / name, Path(args.publish) / name)
        print(f"copied study.json/md/png into {args.publish}")
    if not args.no_tracking:
        from .tracking import log_study
        uri = args.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
        ids = log_study(out, report, uri, args.experiment)
        print(f"logged {len(ids)} runs to MLflow experiment {args.experiment!r} at {uri}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return {"run": cmd_run, "report": cmd_report, "status": cmd_status, "eval-run": cmd_eval_run}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
