"""``megafire bench train``: training throughput of a config, against a peer encoding.

    megafire bench train --config configs/arms/125m-fire.yaml [--steps 20] [--warmup 5]
                         [--peer rope] [--rope-variants] [--out bench.json] [--section.key=value ...]

Runs the real trainer (DeepSpeed engine, curriculum, same micro-batching) for ``--steps``
steps on synthetic data (``data.corpus=synthetic``, so the loader is not what is measured;
override it to include the loader), no checkpoints, no tracking, in a temporary run
directory. Reports the median over the steps after ``--warmup`` of tokens/s, step time and
MFU (GPU, bf16: megafire.flops counts attention and the encoding's own FLOPs), per
sequence length of the curriculum. ``--peer NAME`` runs the same config again with
``model.position.name=NAME`` (default options) and prints the throughput ratio, e.g. FIRE's
cost against RoPE on flash attention on the same shapes. ``--peer none`` skips it.
``--rope-variants`` runs the RoPE arm (the config's own or the peer) twice, with
``model.position.fused_rotary=false`` (torch rotation) and ``=true`` (the Triton kernel),
prints both rows and the fused / torch throughput ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="megafire bench train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from the medians")
    p.add_argument("--peer", default="rope", help="encoding to compare against ('none' to skip)")
    p.add_argument("--rope-variants", action="store_true",
                   help="time the rope arm with model.position.fused_rotary=false and =true")
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_known_args(argv)


def bench_config(config: str, overrides: list[str], steps: int, warmup: int, position: str | None = None) -> dict:
    """Train ``steps`` steps of ``config`` and summarize the per-step records after ``warmup``;
    ``position`` replaces the encoding (with its default options)."""
    from megafire.config import load_config
    from megafire.train.loop import train
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="megafire-bench-") as tmp:
        base = [f"--run.dir={Path(tmp) / 'run'}", "--data.corpus=synthetic", "--tracking.enabled=false",
                "--train.checkpoint_every_steps=0", "--train.progress=false"]
        # keep the config's LR schedule and curriculum proportions out of it: only throughput matters
        cfg = load_config(config, base + overrides + [f"--train.max_steps={steps}"])
        if position is not None:   # set, not merged: the arm's options belong to its own encoding
            cfg.model.position.name, cfg.model.position.options = position, {}
        train(cfg, callbacks=[lambda trainer, record: records.append(record)], save_final=False)
    kept = records[warmup:] or records
    by_len: dict[int, list[dict]] = {}
    for r in kept:
        by_len.setdefault(r["seq_len"], []).append(r)
    summary = {"config": config, "encoding": cfg.model.position.name, "steps": len(records),
               "tokens_per_step": cfg.train.tokens_per_step, "by_seq_len": {}}
    for seq_len, rs in sorted(by_len.items()):
        mfus = [r["mfu"] for r in rs if r["mfu"] is not None]
        summary["by_seq_len"][seq_len] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "step_time_s": statistics.median(r["step_time_s"] for r in rs),
            "mfu": statistics.median(mfus) if mfus else None, "num_steps": len(rs)}
    summary["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in kept)
    return summary


# --rope-variants: (label suffix, extra overrides) per run of the rope arm
ROPE_VARIANTS = (("torch", ["--model.position.fused_rotary=false"]), ("fused", ["--model.position.fused_rotary=true"]))


def _print(summary: dict) -> None:
    for seq_len, s in summary["by_seq_len"].items():
        mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "n/a"
        print(f"{summary['label']:<15} seq_len {seq_len:>6}: {s['tokens_per_s']:>12,.0f} tokens/s  "
              f"{1000 * s['step_time_s']:>9.1f} ms/step  MFU {mfu}  ({s['num_steps']} steps)")


def _run_arm(args, overrides: list[str], encoding: str, position: str | None) -> dict[str, dict]:
    """{suffix: summary}: one run, or one per fused_rotary variant for rope under --rope-variants."""
    variants = ROPE_VARIANTS if args.rope_variants and encoding == "rope" else (("", []),)
    runs = {}
    for suffix, extra in variants:
        summary = bench_config(args.config, overrides + extra, args.steps, args.warmup, position=position)
        summary["label"] = f"{encoding} ({suffix})" if suffix else encoding
        _print(summary)
        runs[suffix] = summary
    if len(runs) > 1:
        ratio = runs["fused"]["tokens_per_s"] / runs["torch"]["tokens_per_s"]
        runs["torch"]["fused_vs_torch"] = runs["fused"]["fused_vs_torch"] = ratio
        print(f"throughput {encoding} fused rotary / torch rotary: {ratio:.3f}")
    return runs


def main(argv: list[str] | None = None) -> int:
    from megafire.config import load_config
    args, overrides = _parse(list(sys.argv[1:] if argv is None else argv))
    if args.steps <= args.warmup:
        print("megafire bench train: --steps must exceed --warmup", file=sys.stderr)
        return 2
    encoding = load_config(args.config, overrides).model.position.name
    result: dict = {}
    for suffix, summary in _run_arm(args, overrides, encoding, None).items():
        result["main" + (f"_{suffix}" if suffix else "")] = summary
    mains = {k: v for k, v in result.items() if k.startswith("main")}
    if args.peer != "none" and args.peer != encoding:
        peers = _run_arm(args, overrides, args.peer, args.peer)
        for suffix, peer in peers.items():
            key = "peer" + (f"_{suffix}" if suffix else "")
            result[key] = peer
            for main_key, main in mains.items():
                ratio = main["tokens_per_s"] / peer["tokens_per_s"]
                result["ratio_vs_" + key if main_key == "main" else f"ratio_{main_key}_vs_{key}"] = ratio
                print(f"throughput {main['label']} / {peer['label']}: {ratio:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0
