#!/usr/bin/env python3
"""Compare the loss traces (and throughput) of runs of the same model in different layouts.

    python launch/compare_traces.py [--rtol 2e-2] [--skip 0] [--out table.md] RUN_DIR [RUN_DIR ...]

Reads each run's ``metrics.jsonl`` (one JSON record per optimizer step, megafire.train) and
prints a Markdown table: steps, final loss, max |loss - loss_ref| / loss_ref over the common
steps (the first run is the reference), median tokens/s and MFU over the steps after the
first 10% (warm-up and compilation excluded), peak GPU memory. Exit status 1 when a trace
differs from the reference by more than --rtol. Standard library only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def read_trace(run_dir: Path) -> dict[int, dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run_dir}: no metrics.jsonl")
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines()) if r.get("loss") is not None}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[Path], skip: int | None = None) -> tuple[list[dict], list[str]]:
    traces = [read_trace(r) for r in runs]
    ref = traces[0]
    rows = []
    for run, trace in zip(runs, traces):
        steps = sorted(trace)
        common = [s for s in steps if s in ref]
        steady = steps[skip if skip is not None else max(1, len(steps) // 10):] or steps
        rel = max((abs(trace[s]["loss"] - ref[s]["loss"]) / abs(ref[s]["loss"]) for s in common), default=None)
        worst = max(common, key=lambda s: abs(trace[s]["loss"] - ref[s]["loss"]), default=None)
        rows.append({
            "run": str(run), "steps": len(steps), "final_loss": trace[steps[-1]]["loss"] if steps else None,
            "max_rel_diff": rel, "worst_step": worst,
            "tokens_per_s": _median(trace[s].get("tokens_per_s") for s in steady),
            "mfu": _median(trace[s].get("mfu") for s in steady),
            "peak_memory_gib": max((trace[s].get("max_memory_gib") or 0.0 for s in steps), default=0.0) or None,
        })
    return rows, [f"{r['run']}: {r['max_rel_diff']:.3g}" for r in rows if r["max_rel_diff"] is None]


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    lines = ["| run | steps | final loss | max rel. loss diff vs first | at step | tokens/s | MFU | peak mem GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['steps']} | {_fmt(r['final_loss'], '.5f')} | {_fmt(r['max_rel_diff'], '.2e')} "
                     f"| {_fmt(r['worst_step'], 'd')} | {_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['mfu'], '.3f')} "
                     f"| {_fmt(r['peak_memory_gib'], '.1f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--rtol", type=float, default=2e-2, help="allowed max relative loss difference")
    ap.add_argument("--skip", type=int, default=None, help="steps excluded from throughput medians")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    rows, _ = summarize(args.runs, args.skip)
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    bad = [r for r in rows if r["max_rel_diff"] is not None and r["max_rel_diff"] > args.rtol]
    for r in bad:
        print(f"FAIL {r['run']}: loss differs from {rows[0]['run']} by {r['max_rel_diff']:.3g} relative "
              f"(step {r['worst_step']}) > --rtol {args.rtol}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
