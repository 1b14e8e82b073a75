"""``megafire bench attention``: fused bias attention vs SDPA-flash, the reference path and Flex.

One run prints, per shape (bf16, causal, B*N = tokens, H heads, head dim D), one row per
variant (``sdpa-flash``; ``fused-<enc>``; ``reference-<enc>``; with ``--flex``, ``flex-<enc>``:
megafire.attention.flex, the compiled FlexAttention score_mod of each bias encoding): ms fwd,
ms fwd+bwd (gradients to q, k, v and every learnable encoding parameter), TFLOP/s of fwd+bwd
(causal attention FLOPs: 2 * 2 * B * H * N^2 * D / 2 forward, 2.5x that backward), peak
memory of fwd+bwd above the inputs, and the ratio of throughput to SDPA-flash. Also a
correctness check of the fused kernels against a float32 reference (``--check``).

``--documents K``: the fused variants (and ``--tune``) run on packed rows as the trainer feeds
them: K documents per row, cut at seeded random points, positions restarting at 0 and segment
ids masking attention across documents (the tile tables skip the dead tiles; FIRE / T5 tiles
next to a restart cover wide distance ranges). ``sdpa-flash`` stays plain causal attention over
the whole row (the speed reference; it masks nothing); reference and Flex rows are not run. Each
call is timed eagerly: at small N (B=32, N=512) the per-call position / tile tables' launches
dominate a fused row (the trainer traces them into its compiled graph); ``--tune`` at N=2048
ranked T5's forward configs 4.57 vs 0.81 ms, kernel time. ``--kernel-time`` reports the summed
GPU time of each call's kernels instead (torch.profiler), which that launch cost is not in. (A
CUDA-graph timing of the backward failed on an H200: capture error, then the RNG offset left
inside the capture.)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

ENCS = ["none", "alibi", "kerple_log", "kerple_power", "t5", "fire"]


def _build(name, H, D, device):
    from megafire.positional import build_encoding
    if name == "none":
        return None
    opts = {"init_L": 512.0} if name == "fire" else {}
    # fixed initialisation: the fused FIRE / T5 kernels' speed depends on where the MLP's kinks
    # fall (tiles they cross take extra work), so every run and every tuning candidate times
    # the same encoding
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return build_encoding(name, num_heads=H, head_dim=D, **opts).to(device)


def packed_positions(B, N, documents, device, seed=0):
    """([B, N] positions restarting at each document, [B, N] int32 segment ids), or (arange(N), None)
    for one document. Cuts: documents - 1 distinct random points in [1, N) per row, seeded."""
    if documents <= 1:
        return torch.arange(N, device=device), None
    if documents > N:
        raise ValueError(f"--documents {documents} > sequence length {N}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(N)
    pos, seg = torch.empty(B, N, dtype=torch.long), torch.empty(B, N, dtype=torch.int32)
    for b in range(B):
        cuts = torch.sort(torch.randperm(N - 1, generator=g)[:documents - 1] + 1).values  # [K-1]
        s = torch.bucketize(idx, cuts, right=True)                                         # [N] doc index
        start = torch.cat([torch.zeros(1, dtype=torch.long), cuts])[s]                     # [N]
        pos[b], seg[b] = idx - start, s.to(torch.int32)
    return pos.to(device), seg.to(device)


def _params(enc):
    return [] if enc is None else [p for p in enc.parameters() if p.requires_grad]


def _flops(B, H, N, D):
    fwd = 2 * 2 * B * H * N * N * D / 2
    return fwd, fwd * 3.5


def _time(fn, reps_ms=200):
    """Median wall ms per call (triton's do_bench), or with ``--kernel-time`` :func:`kernel_ms`."""
    if KERNEL_TIME["on"]:
        return kernel_ms(fn)
    import triton.testing
    # 100 ms of warm-up, not do_bench's 25: a variant's first timing follows its compile (seconds of an idle
    # GPU); in session 7 the first N=4096 forward timings of T5 / FIRE were 1.4x / 1.9x a fresh process's rerun
    return triton.testing.do_bench(fn, warmup=100, rep=reps_ms, return_mode="median")


#: ``--kernel-time``: ms = GPU time of the call's kernels (torch.profiler, summed), not wall time
KERNEL_TIME = {"on": False}


def kernel_ms(fn, reps: int = 20) -> float:
    """Mean GPU time per call of ``fn``: the device time of every kernel / copy it launches,
    summed over ``reps`` calls (torch.profiler, CUDA activity) and divided by ``reps``. Host launch
    cost is not in it (the eager call's table launches are, as GPU work): what a step replayed
    as CUDA graphs pays. Idle gaps between kernels are not counted."""
    from torch.profiler import ProfilerActivity, profile
    t0 = time.perf_counter()
    while True:   # >= 100 ms of warm-up (see _time)
        fn()
        torch.cuda.synchronize()
        if time.perf_counter() - t0 > 0.1:
            break
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    us = sum(e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0)
    return us / reps / 1000.0


def _measure(run_fwd, inputs, params):
    """run_fwd() -> out; returns (ms_fwd, ms_fwdbwd, peak_bytes)."""
    with torch.no_grad():
        ms_f = _time(run_fwd)
    grads_of = [t for t in inputs if t.requires_grad] + params
    out = run_fwd()
    do = torch.randn_like(out)

    def fb():
        for t in grads_of:
            t.grad = None
        run_fwd().backward(do)
    fb()
    torch.cuda.synchronize()
    ms_fb = _time(fb)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fb()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return ms_f, ms_fb, peak


def variants(args, enc_names):
    from megafire.attention.fused import fused_bias_attention

    def sdpa(q, k, v, enc, pos):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True).transpose(1, 2)

    def fused(q, k, v, enc, pos, seg=None):
        return fused_bias_attention(q, k, v, enc, pos, pos, segment_ids_q=seg, segment_ids_k=seg)

    def reference(q, k, v, enc, pos):
        N = q.shape[1]
        mask = torch.full((N, N), float("-inf"), device=q.device).triu(1)
        bias = (enc.bias(pos, pos) + mask).to(q.dtype) if enc is not None else mask.to(q.dtype)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=bias.unsqueeze(0)).transpose(1, 2)

    return sdpa, fused, reference


def _flex():
    """The flex backend as training calls it: compiled FlexAttention, the encoding's score_mod
    (parameter gradients through its captures), a causal BlockMask built once per shape."""
    import torch._dynamo
    from megafire.attention.flex import flex_attention_fn
    # one compiled graph per (encoding, shape, grad mode): more than dynamo's default limit of
    # recompiles of flex_attention in one run, beyond which it silently falls back to eager
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))

    def run(q, k, v, enc, pos):
        return flex_attention_fn(q, k, v, enc, pos, pos, causal=True)
    return run


def check(device, out_rows):
    """fused (bf16) vs a float64 reference on GPU: odd length, GQA, both head dims, every gradient."""
    from megafire.attention.fused import fused_bias_attention
    sys.path.insert(0, "tests/fused")
    import copy
    from fused_ref import reference
    worst = 0.0
    for D in (64, 128):
        for name in ENCS:
            torch.manual_seed(0)
            B, T, H, HKV = 2, 1000, 8, 2
            enc = _build(name, H, D, device)
            if name == "fire":
                with torch.no_grad():
                    enc.L_mult.fill_(200.0 / enc.init_L)
            q = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(B, T, HKV, D, device=device, dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(B, T, HKV, D, device=device, dtype=torch.bfloat16, requires_grad=True)
            pos = torch.arange(T, device=device)
            out = fused_bias_attention(q, k, v, enc, pos, pos)
            do = torch.randn_like(out)
            out.backward(do)
            got = [out, q.grad, k.grad, v.grad] + [p.grad for p in _params(enc)]
            enc2 = copy.deepcopy(enc).double() if enc is not None else None
            if enc2 is not None:
                enc2.zero_grad(set_to_none=True)
            qs, ks, vs = [t.detach().double().requires_grad_() for t in (q, k, v)]
            ref = reference(qs, ks, vs, enc2, pos, pos)
            ref.backward(do.double())
            want = [ref, qs.grad, ks.grad, vs.grad] + [p.grad for p in _params(enc2)]
            names = ["out", "dq", "dk", "dv"] + [n for n, p in ([] if enc is None else enc.named_parameters())
                                                 if p.requires_grad]
            errs = []
            for a, b in zip(got, want):
                a = torch.zeros(()) if a is None else a
                b = torch.zeros(()) if b is None else b
                den = b.double().norm().item()
                e = (a.double() - b.double()).norm().item() / den if den > 1e-9 else (a.double() - b.double()).abs().max().item()
                errs.append(e if math.isfinite(e) else float("inf"))
            worst = max(worst, max(errs))
            out_rows.append(dict(D=D, enc=name, errs={n: f"{e:.1e}" for n, e in zip(names, errs)}))
            print(f"check D={D} {name:13s} rel err vs float64: " + " ".join(f"{n}={e:.1e}" for n, e in zip(names, errs)),
                  flush=True)
    return worst


def _tune_candidates(D):
    fwd = [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3)] if D == 64 else \
        [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 2)]
    bwd = [((64, 64, 4, 2), (64, 64, 4, 2)), ((64, 64, 8, 2), (64, 64, 8, 2)),
           ((128, 64, 8, 2), (64, 128, 8, 2)), ((64, 32, 4, 3), (32, 128, 4, 3)),
           ((64, 64, 8, 2), (32, 64, 4, 3)), ((128, 32, 8, 2), (64, 64, 4, 2)),
           # no spills for FIRE's dq / dkdv (ptxas for sm_90: docs/kernels.md)
           ((128, 32, 8, 2), (64, 64, 8, 2)), ((32, 64, 4, 2), (32, 64, 4, 2))] if D == 64 else \
        [((64, 64, 4, 2), (64, 64, 8, 2)), ((64, 64, 8, 2), (64, 128, 8, 2)),
         ((128, 64, 8, 2), (64, 64, 4, 2)), ((64, 32, 4, 3), (32, 128, 4, 3)),
         # dkdv with (almost) no spills at D=128 (`megafire bench resources`: 64x64/4 spills 264-972 bytes)
         ((128, 64, 8, 2), (64, 64, 8, 2)), ((128, 64, 8, 2), (64, 32, 4, 2))]
    out = []
    for skip in (1, 0):
        for f in fwd:
            out.append(("fwd", {"fwd": f, "skip": skip}))
        for dq, dkdv in bwd:
            out.append(("bwd", {"dq": dq, "dkdv": dkdv, "skip": skip}))
    return out


def _tune_one(job):
    """Runs in a worker process: compile (and run once) one (D, encoding, config)."""
    import os
    D, N, H, tokens, enc_name, cfg, documents = job
    os.environ["MEGAFIRE_FUSED_CONFIGS"] = json.dumps({str(D): cfg})
    from megafire.attention.fused import fused_bias_attention
    dev = torch.device("cuda")
    B = max(1, tokens // N)
    enc = _build(enc_name, H, D, dev)
    q, k, v = [torch.randn(B, N, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    pos, seg = packed_positions(B, N, documents, dev)
    try:
        fused_bias_attention(q, k, v, enc, pos, pos, segment_ids_q=seg, segment_ids_k=seg).sum().backward()
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # noqa
        return f"{type(e).__name__}: {str(e)[:200]}"


def tune(args):
    """Times candidate launch configs (fwd alone; dq+dkdv through fwd+bwd) per D and encoding.
    Compiles in parallel worker processes first (shared Triton cache), then times serially."""
    import multiprocessing as mp
    import os
    encs = args.encodings.split(",")
    N = int(args.seqlens.split(",")[0])
    jobs = []
    for D in [int(x) for x in args.head_dims.split(",")]:
        for e in encs:
            for kind, cfg in _tune_candidates(D):
                jobs.append((D, N, args.heads, args.tokens, e, cfg, args.documents))
    t0 = time.time()
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(14, len(jobs))) as pool:
        status = pool.map(_tune_one, jobs, chunksize=1)
    print(f"tune: compiled {len(jobs)} combos in {time.time() - t0:.0f}s; failures: "
          f"{[(j[0], j[4], j[5], s) for j, s in zip(jobs, status) if s != 'ok']}", flush=True)
    from megafire.attention.fused import fused_bias_attention
    dev = torch.device("cuda")
    res = []
    for (D, N_, H, tokens, e, cfg, docs), st_ in zip(jobs, status):
        if st_ != "ok":
            continue
        os.environ["MEGAFIRE_FUSED_CONFIGS"] = json.dumps({str(D): cfg})
        B = max(1, tokens // N_)
        enc = _build(e, H, D, dev)
        q, k, v = [torch.randn(B, N_, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        pos, seg = packed_positions(B, N_, docs, dev)
        fn = lambda: fused_bias_attention(q, k, v, enc, pos, pos, segment_ids_q=seg, segment_ids_k=seg)  # noqa
        if "fwd" in cfg:
            with torch.no_grad():
                ms = _time(fn, 100)
        else:
            out = fn()
            do = torch.randn_like(out)
            ps = [q, k, v] + _params(enc)

            def fb():
                for t in ps:
                    t.grad = None
                fn().backward(do)
            ms = _time(fb, 150)
        row = dict(D=D, N=N_, documents=docs, enc=e, cfg=cfg, ms=ms)
        res.append(row)
        print(json.dumps(row), flush=True)
    os.environ.pop("MEGAFIRE_FUSED_CONFIGS", None)
    best = {}
    for r in res:
        key = (r["D"], r["enc"], "fwd" if "fwd" in r["cfg"] else "bwd")
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    print("\nbest per (D, encoding, part):")
    for key, r in sorted(best.items()):
        print(key, r["cfg"], f"{r['ms']:.3f} ms")
    if args.json:
        with open(args.json.replace(".json", "") + "_tune.json", "w") as f:
            json.dump(res, f, indent=1)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megafire bench attention", description=__doc__)
    ap.add_argument("--tokens", type=int, default=16384, help="B * N")
    ap.add_argument("--seqlens", default="2048,4096,8192,16384")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--encodings", default=",".join(ENCS))
    ap.add_argument("--reference-max-n", type=int, default=4096, help="materialized-bias path up to this N")
    ap.add_argument("--flex", action="store_true",
                    help="also the flex backend (FlexAttention score_mod) for every bias encoding timed")
    ap.add_argument("--check", action="store_true", help="correctness check first")
    ap.add_argument("--json", default=None, help="write all rows here")
    ap.add_argument("--tune", action="store_true", help="time candidate launch configs (first seqlen) and exit")
    ap.add_argument("--no-table", action="store_true", help="only --check (and --tune)")
    ap.add_argument("--kernel-time", action="store_true",
                    help="ms = summed GPU time of each call's kernels (torch.profiler), not wall time")
    ap.add_argument("--documents", type=int, default=1,
                    help="packed rows: documents per row, positions restarting (fused variants and --tune)")
    args = ap.parse_args(argv)
    KERNEL_TIME["on"] = args.kernel_time
    if not torch.cuda.is_available():
        from megafire.config import ConfigError
        raise ConfigError("megafire bench attention needs a CUDA GPU")
    dev = torch.device("cuda")
    rows, checks = [], []
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    if args.check:
        try:
            worst = check(dev, checks)
        except Exception as e:  # keep benchmarking
            import traceback
            traceback.print_exc()
            worst = float("nan")
        print(f"check worst rel err {worst:.2e}", flush=True)
    if args.tune:
        tune(args)
    if args.no_table or args.tune:
        return 0
    sdpa, fused, reference = variants(args, None)
    encs = args.encodings.split(",")
    tables = []
    for D in [int(x) for x in args.head_dims.split(",")]:
        for N in [int(x) for x in args.seqlens.split(",")]:
            B, H = max(1, args.tokens // N), args.heads
            f_fwd, f_fb = _flops(B, H, N, D)
            pos, seg = packed_positions(B, N, args.documents, dev)
            mk = lambda: torch.randn(B, N, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)  # noqa
            q, k, v = mk(), mk(), mk()
            plan = [("sdpa-flash", sdpa, None)]
            plan += [(f"fused-{e}", fused, e) for e in encs]
            if N <= args.reference_max_n and seg is None:
                plan += [(f"reference-{e}", reference, e) for e in ("alibi", "fire")]
            if args.flex and seg is None:
                plan += [(f"flex-{e}", _flex(), e) for e in encs if e != "none"]
            table = []
            for label, fn, ename in plan:
                enc = _build(ename, H, D, dev) if ename and ename != "none" else None
                try:
                    run = (lambda: fn(q, k, v, enc, pos, seg)) if fn is fused else (lambda: fn(q, k, v, enc, pos))
                    ms_f, ms_fb, peak = _measure(run, [q, k, v], _params(enc))
                    row = dict(D=D, N=N, B=B, H=H, documents=args.documents, variant=label, ms_fwd=ms_f, ms_fwdbwd=ms_fb,
                               tflops=f_fb / ms_fb / 1e9, tflops_fwd=f_fwd / ms_f / 1e9, peak_gib=peak / 2**30)
                except Exception as e:  # OOM, compile failure: record and go on
                    row = dict(D=D, N=N, B=B, H=H, variant=label, error=f"{type(e).__name__}: {str(e)[:120]}")
                    torch.cuda.empty_cache()
                table.append(row)
                rows.append(row)
                print(json.dumps(row), flush=True)
            tables.append(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, checks=checks, gpu=torch.cuda.get_device_name()), f, indent=1)
    for table in tables:
        base = next((r for r in table if r["variant"] == "sdpa-flash" and "error" not in r), None)
        r0 = table[0]
        docs = f", {args.documents} documents per row (fused rows)" if args.documents > 1 else ""
        kt = ", GPU kernel time (--kernel-time)" if args.kernel_time else ""
        print(f"\nB={r0['B']} N={r0['N']} H={r0['H']} D={r0['D']} bf16 causal{docs}{kt}")
        print(f"{'variant':22s} {'fwd ms':>8s} {'f+b ms':>8s} {'TFLOP/s':>8s} {'peak GiB':>9s} {'x sdpa f':>9s} {'x sdpa fb':>9s}")
        for r in table:
            if "error" in r:
                print(f"{r['variant']:22s} {r['error'][:70]}")
                continue
            rf = base["ms_fwd"] / r["ms_fwd"] if base else float("nan")
            rfb = base["ms_fwdbwd"] / r["ms_fwdbwd"] if base else float("nan")
            print(f"{r['variant']:22s} {r['ms_fwd']:8.3f} {r['ms_fwdbwd']:8.3f} {r['tflops']:8.1f} "
                  f"{r['peak_gib']:9.3f} {rf:9.2f} {rfb:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
