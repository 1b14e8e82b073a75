"""``megafire bench train``: training throughput of a config, against a peer encoding.

    megafire bench train --config configs/arms/125m-fire.yaml [--steps 20] [--warmup 5]
                         [--peer rope|compact|none|a,b] [--rope-variants] [--profile DIR]
                         [--ab "--section.key=value ..." [--repeat N]]
                         [--out bench.json] [--section.key=value ...]

Runs the real trainer (DeepSpeed engine, curriculum, same micro-batching) for ``--steps``
steps on synthetic data (``data.corpus=synthetic``, so the loader is not what is measured;
override it to include the loader), no checkpoints, no tracking, in a temporary run
directory. Reports the median over the steps after ``--warmup`` of tokens/s, step time and
MFU (GPU, bf16: megafire.flops counts attention and the encoding's own FLOPs), per
sequence length of the curriculum. ``--peer NAME`` runs the same config again with
``model.position.name=NAME`` (default options) and prints the throughput ratio, e.g. FIRE's
cost against RoPE on flash attention on the same shapes. ``--peer compact`` runs the
reference arm of :mod:`megafire.bench.compact` instead: a compact ``torch.compile`` GPT of
the same shape and micro-batch (SDPA causal, fused AdamW, bf16 autocast), the speed a
researcher gets outside megafire. Several peers: ``--peer compact,rope``. ``--peer none`` skips it.
``NAME@BACKEND`` runs that peer with ``attention.backend=BACKEND`` (e.g. ``--peer rope,rope@sdpa``:
RoPE under ``auto`` and on SDPA in one run).
``--profile DIR`` traces one optimizer step of the main arm after the warm-up with
torch.profiler: ``DIR/trace.json.gz`` (chrome trace) and ``DIR/profile.json`` + a printed
table (GPU kernel time by category, GPU busy time against the step's wall time).
``--rope-variants`` runs the RoPE arm (the config's own or the peer) twice, with
``model.position.fused_rotary=false`` (torch rotation) and ``=true`` (the Triton kernel),
prints both rows and the fused / torch throughput ratio.

``--ab "OVERRIDES" [--repeat N]`` compares two configurations of the main arm in one process:
A = the config with the command line's overrides, B = A plus ``OVERRIDES`` (``--section.key=value``
words, e.g. ``--ab "--attention.fused_kernels.64.t5_band=false"``), in N pairs run in ABBA order
(A B, B A, A B, ...: each arm as often first as second, so a drift of the machine or an arm's
position in the process weighs on both alike). Each run starts as a process of its own would
(``fresh_arm``). Prints, per sequence length, each arm's median tokens/s over its runs with the
range, and the median of the pairs' B / A ratios with their range: a difference inside the
pairs' range is not resolved. Between separate processes the same arm varied by up to 22% on a
host-bound H100 (docs/benchmarks.md, 2026-12-05), more than the options being decided. No peers
with ``--ab`` (``--peer`` defaults to none there).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="megafire bench train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from the medians")
    p.add_argument("--peer", default=None, help="encoding(s) to compare against, comma-separated (default rope; "
                   "none with --ab); NAME@BACKEND sets attention.backend for that arm; 'compact' is the reference GPT, "
                   "'none' skips")
    p.add_argument("--ab", help="A/B in one process: B = the main arm plus these overrides (one string of "
                   "--section.key=value words), run in ABBA order against A")
    p.add_argument("--repeat", type=int, default=None, help="A/B pairs with --ab (default 2)")
    p.add_argument("--rope-variants", action="store_true",
                   help="time the rope arm with model.position.fused_rotary=false and =true")
    p.add_argument("--profile", help="trace one step of the main arm into this directory")
    p.add_argument("--out", help="write the results as JSON here")
    # --ab's value begins with "--" (override words), which argparse takes for an option: join it
    argv = [*argv]
    for i, word in enumerate(argv[:-1]):
        if word == "--ab":
            argv[i:i + 2] = [f"--ab={argv[i + 1]}"]
            break
    return p.parse_known_args(argv)


def bench_config(config: str, overrides: list[str], steps: int, warmup: int, position: str | None = None,
                 profile_dir: str | None = None) -> dict:
    """Train ``steps`` steps of ``config`` and summarize the per-step records after ``warmup``;
    ``position`` replaces the encoding (with its default options); ``profile_dir`` traces
    step ``warmup + 1``."""
    from megafire.config import load_config
    from megafire.train.loop import train
    held = fresh_arm()
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="megafire-bench-") as tmp:
        base = [f"--run.dir={Path(tmp) / 'run'}", "--data.corpus=synthetic", "--tracking.enabled=false",
                "--train.checkpoint_every_steps=0", "--train.progress=false"]
        # keep the config's LR schedule and curriculum proportions out of it: only throughput matters
        cfg = load_config(config, base + overrides + [f"--train.max_steps={steps}"])
        if position is not None:   # set, not merged: the arm's options belong to its own encoding
            cfg.model.position.name, cfg.model.position.options = position, {}
        callbacks = [lambda trainer, record: records.append(record)]
        profiler = _StepProfiler(profile_dir, warmup) if profile_dir else None
        if profiler is not None:
            callbacks.append(profiler)
        train(cfg, callbacks=callbacks, save_final=False)
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
            "mfu": statistics.median(mfus) if mfus else None, "num_steps": len(rs),
            "max_memory_gib": max((r.get("max_memory_gib") or 0.0) for r in rs) or None}
    summary["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in kept)
    if profiler is not None and profiler.summary is not None:
        summary["profile"] = profiler.summary
    return own_peak(summary, held)


def fresh_arm() -> float:
    """Start an arm as a process of its own would: dynamo's caches emptied (the arms' blocks share
    Block.forward's code object: after a few arms, dynamo's recompile limit would silently run the
    later arms' blocks eagerly), the earlier arms' garbage collected and the peak-memory counter
    reset (it would report the largest arm so far). Returns the GiB still allocated after that
    (what earlier arms hold): the arm's own peak is the counter's peak minus it. Without the
    subtraction, peaks rose with the arms' order in every multi-arm run (docs/benchmarks.md)."""
    import gc

    import torch
    torch._dynamo.reset()
    gc.collect()
    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**30


def own_peak(summary: dict, held_gib: float) -> dict:
    """``summary`` with each length's ``max_memory_gib`` reduced by what earlier arms held at the
    arm's start (kept as ``held_gib``)."""
    summary["held_gib"] = held_gib
    for s in summary["by_seq_len"].values():
        if s.get("max_memory_gib"):
            s["max_memory_gib"] -= held_gib
    return summary


def ratio_at_matched_lengths(main: dict, peer: dict) -> float:
    """tokens/s of ``main`` over ``peer`` at the sequence lengths both ran (median of the
    per-length ratios); the overall medians when they share none."""
    common = [n for n in main["by_seq_len"] if n in peer["by_seq_len"]]
    if not common:
        return main["tokens_per_s"] / peer["tokens_per_s"]
    return statistics.median(main["by_seq_len"][n]["tokens_per_s"] / peer["by_seq_len"][n]["tokens_per_s"]
                             for n in common)


#: kernel-name fragments -> category, first match wins: attention kernels before GEMMs (cuDNN's
#: flash kernels carry 'wgmma' in their names), then cuBLAS / CUTLASS GEMMs, inductor's generated
#: Triton, and the rest by what torch's eager kernels are called
CATEGORIES = (("attention", ("flash", "fmha", "attn", "sdpa", "_fwd_kernel", "_bwd_dq", "_bwd_dkdv", "_delta",
                             "_tables", "_fire", "_t5")),
              ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "wgmma", "cublas")),
              ("compiled (inductor)", ("triton_",)),
              ("optimizer", ("adam", "multi_tensor", "foreach")),
              ("cross entropy", ("log_softmax", "nll_loss", "softmax", "cross_entropy")),
              ("copy / cast", ("copy", "memcpy", "memset", "cast", "to_copy", "fill")),
              ("communication", ("nccl",)),
              ("reduction", ("reduce",)),
              ("elementwise", ("elementwise", "vectorized", "unrolled")))


def categorize(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other")


class _StepProfiler:
    """A trainer callback: starts torch.profiler after step ``warmup`` and stops after the next."""

    def __init__(self, out_dir: str, warmup: int):
        self.out_dir, self.start_after = Path(out_dir), max(warmup, 1)
        self.prof, self.summary, self.t0 = None, None, 0.0

    def __call__(self, trainer, record) -> None:
        import time

        import torch
        from torch.profiler import ProfilerActivity, profile
        if record["step"] == self.start_after:
            torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif self.prof is not None and record["step"] == self.start_after + 1:
            torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            self.summary = summarize_profile(self.prof, wall)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(self.out_dir / "trace.json.gz"))   # torch gzips a .gz path
            (self.out_dir / "profile.json").write_text(json.dumps(self.summary, indent=2))
            _print_profile(self.summary)
            self.prof = None


def summarize_profile(prof, wall_s: float) -> dict:
    """GPU kernel time by category and the top kernels, from a finished torch.profiler run."""
    by_cat: dict[str, float] = {}
    kernels: dict[str, float] = {}
    count = 0
    for evt in prof.events():
        if evt.device_type.name != "CUDA":
            continue
        us = evt.device_time
        count += 1
        by_cat[categorize(evt.name)] = by_cat.get(categorize(evt.name), 0.0) + us
        kernels[evt.name] = kernels.get(evt.name, 0.0) + us
    busy = sum(by_cat.values()) / 1e6
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    # where the host's time goes (self time of each op / Python-level region, with call counts):
    # a host-bound step is read here, not in the kernel table
    host = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0),
                  key=lambda e: -e.self_cpu_time_total)[:25]
    return {"wall_s": wall_s, "gpu_busy_s": busy, "gpu_busy_fraction": busy / wall_s if wall_s else None,
            "kernel_launches": count,
            "by_category_ms": {k: v / 1e3 for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [[name[:90], us / 1e3] for name, us in top],
            "top_host_self_ms": [[e.key[:90], e.self_cpu_time_total / 1e3, e.count] for e in host]}


def _print_profile(p: dict) -> None:
    print(f"profile: wall {1000 * p['wall_s']:.1f} ms, GPU busy {1000 * p['gpu_busy_s']:.1f} ms "
          f"({100 * (p['gpu_busy_fraction'] or 0):.0f}%), {p['kernel_launches']} kernels")
    for cat, ms in p["by_category_ms"].items():
        print(f"  {cat:<22} {ms:>9.1f} ms")
    for name, ms in p["top_kernels_ms"][:8]:
        print(f"    {ms:>8.1f} ms  {name}")
    print("  host (self time, calls):")
    for name, ms, calls in p.get("top_host_self_ms", [])[:12]:
        print(f"    {ms:>8.1f} ms {calls:>6}x  {name}")


# --rope-variants: (label suffix, extra overrides) per run of the rope arm
ROPE_VARIANTS = (("torch", ["--model.position.fused_rotary=false"]), ("fused", ["--model.position.fused_rotary=true"]))


def _print(summary: dict) -> None:
    for seq_len, s in summary["by_seq_len"].items():
        mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "n/a"
        mem = f"{s['max_memory_gib']:.1f} GiB" if s.get("max_memory_gib") else "n/a"
        if summary.get("held_gib"):
            mem += f" (+{summary['held_gib']:.1f} held by earlier arms)"
        print(f"{summary['label']:<15} seq_len {seq_len:>6}: {s['tokens_per_s']:>12,.0f} tokens/s  "
              f"{1000 * s['step_time_s']:>9.1f} ms/step  MFU {mfu}  peak {mem}  ({s['num_steps']} steps)"
              + (f"  arm {summary['arm_wall_s']:.0f} s" if summary.get("arm_wall_s") is not None else ""))


def parse_arm(name: str) -> tuple[str, str]:
    """``--peer`` entry -> (encoding, attention backend or ""): ``rope@sdpa`` -> ("rope", "sdpa").
    ConfigError for a backend megafire does not have, or one given to the compact peer."""
    from megafire.attention import BACKENDS
    from megafire.config import ConfigError
    encoding, at, backend = name.partition("@")
    if at and (encoding == "compact" or backend not in BACKENDS):
        raise ConfigError(f"megafire bench train --peer {name}: the part after '@' is an attention.backend of a "
                          f"megafire arm (allowed: {', '.join(BACKENDS)}); the compact peer has none")
    return encoding, backend


def _run_arm(args, overrides: list[str], encoding: str, position: str | None,
             seq_lens: list[int] | None = None) -> dict[str, dict]:
    """{suffix: summary}: one run, or one per fused_rotary variant for rope under --rope-variants.
    ``seq_lens``: the lengths the main arm ran (the compact peer times only those)."""
    encoding, backend = parse_arm(encoding)
    if backend:
        overrides = [*overrides, f"--attention.backend={backend}"]
    label = f"{encoding}@{backend}" if backend else encoding
    t0 = time.perf_counter()   # the arm's whole time, build and compiles included: what a device call pays
    if encoding == "compact":
        from megafire.config import load_config

        from .compact import bench_compact
        held = fresh_arm()
        summary = own_peak(bench_compact(load_config(args.config, overrides), args.steps, args.warmup, seq_lens),
                           held)
        summary["label"], summary["arm_wall_s"] = "compact", time.perf_counter() - t0
        _print(summary)
        return {"": summary}
    variants = ROPE_VARIANTS if args.rope_variants and encoding == "rope" else (("", []),)
    runs = {}
    for suffix, extra in variants:
        t0 = time.perf_counter()
        profile = args.profile if position is None and not suffix else None
        summary = bench_config(args.config, overrides + extra, args.steps, args.warmup, position=position,
                               profile_dir=profile)
        summary["label"] = f"{label} ({suffix})" if suffix else label
        summary["arm_wall_s"] = time.perf_counter() - t0
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
    if args.ab is not None:
        return _main_ab(args, overrides, encoding)
    if args.repeat is not None:
        from megafire.config import ConfigError
        raise ConfigError("megafire bench train --repeat counts the A/B pairs of --ab; give --ab \"OVERRIDES\" "
                          "with it")
    args.peer = "rope" if args.peer is None else args.peer
    names = [p for p in args.peer.split(",") if p and p not in ("none", encoding)]
    for name in names:   # every entry checked before the first arm runs
        parse_arm(name)
    if "compact" in names:
        import torch
        if not torch.cuda.is_available():   # before the main arm runs, not after
            from megafire.config import ConfigError
            raise ConfigError("megafire bench train --peer compact needs a CUDA GPU (the peer is torch.compile + "
                              "bf16 autocast on CUDA); use --peer rope or --peer none here")
    result: dict = {}
    for suffix, summary in _run_arm(args, overrides, encoding, None).items():
        result["main" + (f"_{suffix}" if suffix else "")] = summary
    mains = {k: v for k, v in result.items() if k.startswith("main")}
    seq_lens = sorted({int(n) for main in mains.values() for n in main["by_seq_len"]})
    for name in names:
        enc = parse_arm(name)[0]
        peers = _run_arm(args, overrides, name, None if enc == "compact" else enc, seq_lens)
        for suffix, peer in peers.items():
            key = "peer" + (f"_{suffix}" if suffix else "") + (f"_{name.replace('@', '_')}" if len(names) > 1 else "")
            result[key] = peer
            for main_key, main in mains.items():
                ratio = ratio_at_matched_lengths(main, peer)
                result["ratio_vs_" + key if main_key == "main" else f"ratio_{main_key}_vs_{key}"] = ratio
                print(f"throughput {main['label']} / {peer['label']}: {ratio:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def ab_overrides(text: str, config: str, overrides: list[str]) -> list[str]:
    """``--ab``'s string -> its override words, checked before any arm runs: each a
    ``--section.key=value`` that the config loader accepts on top of A's (ConfigError naming the key
    otherwise), and none of ``attention.fused_kernels`` while ``MEGAFIRE_FUSED_CONFIGS`` is set (the
    variable wins over a run's kernel options: B would silently run A's kernels)."""
    import os
    import shlex

    from megafire.config import ConfigError, load_config
    words = shlex.split(text)
    bad = [w for w in words if not (w.startswith("--") and "=" in w)]
    if not words or bad:
        raise ConfigError(f"megafire bench train --ab: expected --section.key=value words, got {text!r}"
                          + (f" ({', '.join(map(repr, bad))} is not one)" if bad else ""))
    if os.environ.get("MEGAFIRE_FUSED_CONFIGS") and any(w.startswith("--attention.fused_kernels") for w in words):
        raise ConfigError("megafire bench train --ab sets attention.fused_kernels, but MEGAFIRE_FUSED_CONFIGS is set "
                          "and overrides a run's kernel options: unset it for the A/B")
    load_config(config, overrides + words)
    return words


def ab_order(repeat: int) -> list[str]:
    """The arms of ``repeat`` A/B pairs in ABBA order: AB, BA, AB, ..."""
    return [arm for k in range(repeat) for arm in (("A", "B") if k % 2 == 0 else ("B", "A"))]


def ab_report(runs: dict[str, list[dict]]) -> dict:
    """Per sequence length: each arm's median tokens/s over its runs with (min, max), the pairs'
    B / A ratios (pair k: A's k-th run against B's k-th) and their median."""
    out = {}
    lengths = sorted(set.intersection(*(set(r["by_seq_len"]) for arm in runs.values() for r in arm)), key=int)
    for n in lengths:
        tps = {arm: [r["by_seq_len"][n]["tokens_per_s"] for r in rs] for arm, rs in runs.items()}
        ratios = [b / a for a, b in zip(tps["A"], tps["B"])]
        out[n] = {**{arm: {"median": statistics.median(v), "min": min(v), "max": max(v)} for arm, v in tps.items()},
                  "ratios": ratios, "ratio_median": statistics.median(ratios)}
    return out


def _main_ab(args, overrides: list[str], encoding: str) -> int:
    from megafire.config import ConfigError
    if args.peer not in (None, "none"):
        raise ConfigError(f"megafire bench train --ab compares two configurations of the main arm; it runs no "
                          f"peers (got --peer {args.peer}): leave --peer out or give --peer none")
    args.repeat = 2 if args.repeat is None else args.repeat
    if args.repeat < 1:
        raise ConfigError(f"megafire bench train --repeat must be >= 1 (A/B pairs), got {args.repeat}")
    if args.rope_variants:
        raise ConfigError("megafire bench train --ab and --rope-variants do not combine: give the rotary switch "
                          "to --ab instead (--ab \"--model.position.fused_rotary=false\")")
    extra = ab_overrides(args.ab, args.config, overrides)
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    order = ab_order(args.repeat)
    for i, arm in enumerate(order):
        profile = args.profile if i == 0 else None    # one trace: the first run (A)
        summary = bench_config(args.config, overrides + (extra if arm == "B" else []), args.steps, args.warmup,
                               profile_dir=profile)
        summary["label"] = f"{encoding} [{arm}{len(runs[arm]) + 1}]"
        summary["overrides"] = extra if arm == "B" else []
        _print(summary)
        runs[arm].append(summary)
    report = ab_report(runs)
    print(f"A/B, {args.repeat} pair(s) in ABBA order; B = A + {' '.join(extra)}")
    for n, r in report.items():
        print(f"  seq_len {n:>6}: A {r['A']['median']:>12,.0f} tokens/s ({r['A']['min']:,.0f}-{r['A']['max']:,.0f})"
              f"  B {r['B']['median']:>12,.0f} ({r['B']['min']:,.0f}-{r['B']['max']:,.0f})"
              f"  B/A {r['ratio_median']:.3f} (pairs {min(r['ratios']):.3f}-{max(r['ratios']):.3f})")
    if args.out:
        Path(args.out).write_text(json.dumps({"A": runs["A"], "B": runs["B"], "ab_overrides": extra,
                                              "order": order, "by_seq_len": report}, indent=2))
    return 0
