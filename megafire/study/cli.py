"""``megafire study {run, report, status, eval-run}``: the length-generalization study (issue 14).

    megafire study run --plan configs/study/plan.yaml --out study_out [--tokens N] [--concurrency K]
                       [--arms a,b-s1235] [--seeds 1234,1235] [--device cuda] [--export-dir DIR]
                       [--detach --wait SECONDS] [-- --section.key=value ...]
    megafire study report --out study_out [--from-tarball study_results.tar.gz ...] [--merge docs/study.json]
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
    run.add_argument("--tokens", type=int, help="training tokens per run (default: the plan's); an arm with its "
                                                "own budget keeps it ('0.5x' scales with this)")
    run.add_argument("--concurrency", type=int, help="runs at once (default: the plan's)")
    run.add_argument("--arms", help="comma-separated subset of the plan's arms (each with its seeds) and single "
                                    "jobs arm-s<seed> (that seed only), run in this order")
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
    rep.add_argument("--from-tarball", action="append", default=[],
                     help="a study_results.tar.gz of `study run --export-dir`: unpacked into --out (repeatable)")
    rep.add_argument("--merge", action="append", default=[],
                     help="a written study.json (e.g. docs/study.json) whose runs are folded in without re-running "
                          "them; a run under --out replaces the merged run of the same arm and seed (repeatable)")
    rep.add_argument("--plan", default=None, help="plan (for the arms' ablation notes); default: as recorded")
    rep.add_argument("--allow-data-rebuild", action="store_true",
                     help="merge runs evaluated on the same held-out documents with other token counts (another "
                          "build of the study data); the report lists each run's build")
    rep.add_argument("--tracking-uri", default="", help="MLflow store (default: sqlite:///OUT/mlflow.db)")
    rep.add_argument("--experiment", default="megafire-study")
    rep.add_argument("--no-tracking", action="store_true")
    rep.add_argument("--publish", help="also copy study.json/md/png into this directory (e.g. docs)")
    rep.add_argument("--reading", help="a Markdown file with the reading of the numbers, put under study.md's "
                                       "'Reading' (e.g. docs/study_reading.md)")
    st = sub.add_parser("status", help="progress of a study: the log's last lines, then one line per run")
    st.add_argument("--out", default="study_out")
    st.add_argument("--log-lines", type=int, default=15, help="last lines of progress.log to show first (0: none)")
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
                     else str(a.config), "seeds": a.seeds, "eval_scalings": a.scalings, "ablation": a.ablation,
                     "baseline": a.baseline, "tokens": a.tokens}
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
        own = {j.arm.name: j.arm.budget(tokens) for j in jobs if j.arm.budget(tokens) != tokens}
        log_progress(out, f"run: {len(jobs)} jobs ({', '.join(j.name for j in jobs)}), {tokens:,} tokens each"
                     + (f" (own budgets: {', '.join(f'{a} {n:,}' for a, n in own.items())})" if own else "")
                     + f", concurrency {concurrency}")
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


def status_table(out: Path) -> list[str]:
    """One line per run directory (report.collect_runs): state, steps, tokens, seconds, loss,
    prose perplexity."""
    from .report import collect_runs
    lines = [f"{'job':<26} {'state':<10} {'step':>9} {'tokens':>11} {'train s':>7} {'eval s':>6} {'loss':>6}  "
             "prose ppl 1x / 4x / 16x"]
    for r in collect_runs(out):
        done, ev = r["train"] or {}, r["eval"]
        last = r["metrics"][-1] if r["metrics"] else {}
        state = ("evaluated" if ev else "trained" if done.get("rc") == 0 else
                 f"FAILED {done.get('rc')}" if done else "training" if last else "starting")
        ppl = ""
        if ev:
            by_len = ev["perplexity"]["none"].get("prose") or next(iter(ev["perplexity"]["none"].values()))
            Ls = sorted(by_len, key=int)
            ppl = " / ".join(f"{by_len[L]:.2f}" for L in (Ls[0], Ls[min(2, len(Ls) - 1)], Ls[-1]))
        steps = f"{last.get('step', 0)}/{done.get('max_steps', '?')}"
        loss = f"{last['loss']:.3f}" if isinstance(last.get("loss"), float) else "-"
        secs = [f"{v:.0f}" if isinstance(v, (int, float)) else "-" for v in (done.get("seconds"), (ev or {}).get("seconds"))]
        lines.append(f"{r['name']:<26} {state:<10} {steps:>9} {last.get('tokens', 0):>11,} "
                     f"{secs[0]:>7} {secs[1]:>6} {loss:>6}  {ppl}")
    return lines


def cmd_status(args) -> int:
    from .runner import runner_active
    out = Path(args.out).resolve()
    runs = sorted((out / "runs").glob("*-s*"))
    trained = [r.name for r in runs if (r / "train_done.json").is_file()]
    evaluated = [r.name for r in runs if (r / "eval" / "study_eval.json").is_file()]
    log = out / "progress.log"
    if log.is_file() and args.log_lines:
        print("\n".join(log.read_text().splitlines()[-args.log_lines:]))
    print(f"{out}: runner {'active' if runner_active(out) else 'idle'}; {len(runs)} run dirs, "
          f"{len(trained)} trained, {len(evaluated)} evaluated")
    print("\n".join(status_table(out)))
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
    for tarball in args.from_tarball:
        unpack_tarball(Path(tarball), out)
    arms = None
    if args.plan:
        from .plan import load_plan
        arms = plan_arms_summary(load_plan(args.plan))
    reading = Path(args.reading) if args.reading else None
    if reading is not None and not reading.is_file():
        from megafire.config import MissingFileError
        raise MissingFileError(f"--reading {str(reading)!r} does not exist")
    report = write_report(out, arms, reading=reading, merge=[Path(m) for m in args.merge],
                          allow_data_rebuild=args.allow_data_rebuild)
    print(f"wrote {out / 'study.json'}, {out / 'study.md'}, {out / 'study.png'} ({len(report['runs'])} runs"
          + (f", those of {', '.join(args.merge)} included" if args.merge else "") + ")")
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
        print(f"logged {len(ids)} runs to MLflow experiment {args.experiment!r} at {uri}"
              + (" (the run directories under --out; merged runs were logged when they were reported)"
                 if args.merge else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return {"run": cmd_run, "report": cmd_report, "status": cmd_status, "eval-run": cmd_eval_run}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
