"""Host time of one fused attention call (forward + backward) against its GPU time.

At small shapes, e.g. a 125M model's first curriculum stage (B=32, N=512, H=12, D=64), a
training step can be bound by the host issuing kernels rather than by the GPU. This prints,
per encoding: the host time to issue one fwd+bwd call (no sync), and the GPU time per call
measured with the host far ahead (the stream held by a sleep kernel while calls queue up).
``--profile`` adds a cProfile of the FIRE calls (where the host time goes).

    megafire bench overhead [--encodings fire,alibi] [--shape B,N,H,D] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time


def main(argv=None) -> int:
    import torch
    from megafire.attention.fused import fused_bias_attention
    from megafire.bench.attention import _build
    ap = argparse.ArgumentParser(prog="megafire bench overhead", description=__doc__.split("\n")[0])
    ap.add_argument("--encodings", default="fire,alibi,kerple_log,t5")
    ap.add_argument("--shape", default="32,512,12,64", help="B,N,H,D")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    try:
        B, N, H, D = (int(x) for x in args.shape.split(","))
    except ValueError:
        ap.error(f"--shape must be four integers B,N,H,D (e.g. 32,512,12,64), got {args.shape!r}")
    if not torch.cuda.is_available():
        from megafire.config import ConfigError
        raise ConfigError("megafire bench overhead needs a CUDA GPU (it times the Triton kernels)")
    dev = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name()}  B={B} N={N} H={H} D={D} bf16, bf16 encoding weights")
    for name in args.encodings.split(","):
        enc = _build(name, H, D, dev)                 # the attention bench's fixed-seed encoding
        enc = None if enc is None else enc.to(torch.bfloat16)
        q, k, v = (torch.randn(B, N, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        pos = torch.arange(N, device=dev)
        do = torch.randn(B, N, H, D, device=dev, dtype=torch.bfloat16)

        def fb():
            fused_bias_attention(q, k, v, enc, pos, pos).backward(do)
        for _ in range(5):
            fb()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            fb()
        host = (time.perf_counter() - t0) / args.calls
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(2e9))   # ~1 s: the calls below queue up behind it
        e0.record()
        for _ in range(args.calls):
            fb()
        e1.record()
        torch.cuda.synchronize()
        print(f"{name:14s} host {1e3 * host:.3f} ms/call   GPU {e0.elapsed_time(e1) / args.calls:.3f} ms/call", flush=True)
        if args.profile and name == "fire":
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(20):
                fb()
            torch.cuda.synchronize()
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
            print(s.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
