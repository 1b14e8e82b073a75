"""``megafire demo --out DIR``: the whole pipeline on the embedded corpus, on a CPU.

1. tokenizer + webdataset shards from the embedded default corpus (once, shared by all arms);
2. one small GPT per encoding family, trained with DeepSpeed on identical data, seed and
   token budget, with a two-stage length curriculum (``configs/demo-cpu.yaml``);
3. perplexity on held-out long documents at 1x, 2x, 4x, 8x and 16x the training length;
4. ``DIR/length_generalization.json`` ``{"train_length": T, "results": {encoding: {length:
   perplexity}}}``, ``DIR/length_generalization.png`` and ``DIR/summary.md``.

Arms differ only in ``model.position`` (FIRE's threshold L is scaled to the training
length, as DESIGN.md requires). Training runs as one subprocess per arm, ``--jobs`` at a
time, each with ``cores / jobs`` threads: the demo's matrices are too small for two
threads to help one process much, so two one-thread processes finish sooner.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo-cpu.yaml"
# longest-training arms first, so that two workers finish close together
DEFAULT_ARMS = ("fire", "t5", "rope", "alibi", "kerple_log", "nope")


def arm_overrides(arm: str, train_length: int) -> list[str]:
    """The only lines in which arms differ: the position encoding and its options."""
    over = [f"--model.position.name={arm}"]
    if arm == "fire":
        # the reference's L = 512 suits training length 2048: keep the same ratio
        over.append(f"--model.position.options.init_L={max(train_length // 4, 1)}")
    return over


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megafire demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="output directory")
    p.add_argument("--config", default=str(CONFIG), help="base config of every arm")
    p.add_argument("--encodings", default=",".join(DEFAULT_ARMS), help="comma-separated encodings to train")
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="arms trained at once")
    p.add_argument("--tracking", action="store_true", help="log every arm to MLflow (sqlite in each run dir)")
    p.add_argument("overrides", nargs="*", help="extra --section.key=value overrides for every arm")
    return p


def prepare_data(cfg, data_dir: Path) -> tuple[Path, Path]:
    from megafire.data.prep import prep_shards, prep_tokenizer
    tok_dir, shard_dir = data_dir / "tokenizer", data_dir / "shards" / "train"
    t0 = time.time()
    prep_tokenizer(cfg.data.corpus, tok_dir, cfg.model.vocab_size, cfg.data.tokenizer_type)
    prep_shards(cfg.data.corpus, tok_dir, shard_dir, progress=False)
    print(f"[demo] data ready in {time.time() - t0:.1f}s: {tok_dir}, {shard_dir}", flush=True)
    return tok_dir, shard_dir


def train_arm(arm: str, args, common: list[str], train_length: int, threads: int) -> tuple[str, int, float]:
    run_dir = Path(args.out) / "runs" / arm
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "megafire.cli", "train", "--config", args.config, f"--run.dir={run_dir}",
           f"--run.name=demo-{arm}", *common, *arm_overrides(arm, train_length), *args.overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(run_dir / "train.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    dt = time.time() - t0
    print(f"[demo] {arm:<11} trained in {dt:5.1f}s (exit {rc}; log {run_dir / 'train.log'})", flush=True)
    return arm, rc, dt


def summarize(out: Path, report: dict, times: dict, wall: float) -> str:
    lengths = report["lengths"]
    head = "| encoding | " + " | ".join(f"{L} ({L // report['train_length']}x)" for L in lengths) + " | train s |"
    rows = [head, "|" + "---|" * (len(lengths) + 2)]
    for name, by_len in report["results"].items():
        cells = " | ".join(f"{by_len[L]:.2f}" for L in lengths)
        rows.append(f"| {name} | {cells} | {times.get(name, 0):.0f} |")
    text = (f"Perplexity on held-out documents (train length {report['train_length']}); "
            f"demo wall time {wall:.0f}s.\n\n" + "\n".join(rows) + "\n")
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.time()
    from megafire.config import ConfigError, load_config
    out = Path(args.out).resolve()
    args.out = str(out)
    arms = [a.strip() for a in args.encodings.split(",") if a.strip()]
    from megafire.positional import ENCODINGS
    bad = [a for a in arms if a not in ENCODINGS]
    if bad:
        raise ConfigError(f"megafire demo: unknown encoding(s) {bad}; allowed: {', '.join(ENCODINGS)}")
    base = load_config(args.config, args.overrides)
    train_length = base.train_length
    tok_dir, shard_dir = prepare_data(base, out / "data")
    common = [f"--data.tokenizer_dir={tok_dir}", f"--data.shards_dir={shard_dir}",
              f"--tracking.enabled={'true' if args.tracking else 'false'}", "--train.progress=false"]
    jobs = max(1, min(args.jobs, len(arms)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ThreadPoolExecutor(jobs) as pool:
        done = list(pool.map(lambda a: train_arm(a, args, common, train_length, threads), arms))
    failed = [a for a, rc, _ in done if rc != 0]
    if failed:
        raise SystemExit(f"megafire demo: training failed for {failed}; see {out}/runs/<encoding>/train.log")
    times = {a: dt for a, _, dt in done}

    from megafire.eval.cli import main as eval_main
    multiples = ",".join(str(m) for m in base.eval.length_multiples)
    eval_args = [x for a in arms for x in ("--checkpoint", str(out / "runs" / a), "--name", a)]
    eval_args += ["--multiples", multiples, "--out", str(out)]
    if not args.tracking:
        eval_args.append("--no-tracking")
    t_eval = time.time()
    eval_main(eval_args)
    print(f"[demo] evaluation took {time.time() - t_eval:.1f}s", flush=True)
    report = json.loads((out / "length_generalization.json").read_text())
    report["results"] = {k: {int(L): v for L, v in r.items()} for k, r in report["results"].items()}
    print(summarize(out, report, times, time.time() - t_start))
    print(f"[demo] {out / 'length_generalization.json'}\n[demo] {out / 'length_generalization.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
