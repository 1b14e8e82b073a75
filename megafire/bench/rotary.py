"""``megafire bench rotary``: RoPE's q/k rotation, torch path vs the fused Triton kernel.

    megafire bench rotary [--tokens 16384] [--batch 4] [--heads 12] [--kv-heads 12] [--head-dim 64]
                          [--dtype bf16] [--scaling none] [--partial 1.0] [--no-compile] [--out rotary.json]

Times forward and forward + backward of ``RoPE.rotate`` on CUDA for q [B, T, H, D] and k
[B, T, Hkv, D] (B * T = ``--tokens``), positions [B, T] (the trainer's packed documents):
the torch path (``fused_rotary=false``, the reference), the same code under
``torch.compile`` (the strongest peer that needs no kernel of ours), flash-attn's
``apply_rotary_emb`` if installed (cos/sin built by the module, their cost included), and
the Triton kernel (``fused_rotary=true``) at its default tile and a few token blocks. Prints ms, the bandwidth
counting q and k read once and written once, the speedup over the torch path, and the
largest difference from the torch path's output (fp32 units).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megafire bench rotary", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="B * T")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=None, help="default: = --heads")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--scaling", default="none", help="none | linear | ntk | dynamic | yarn (factor 4)")
    p.add_argument("--partial", type=float, default=1.0, help="partial_rotary_factor")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--out", help="write the rows as JSON here")
    return p.parse_args(argv)


def _encoding(args, seq_len: int):
    from megafire.positional import build_encoding
    options = {"partial_rotary_factor": args.partial}
    if args.scaling != "none":
        options.update(scaling=args.scaling, factor=4.0)
        if args.scaling in ("dynamic", "yarn"):
            options["original_max_positions"] = max(seq_len // 4, 1)
    return build_encoding("rope", num_heads=args.heads, head_dim=args.head_dim, **options)


def _flash_rotary(enc):
    """flash-attn's rotate-half kernel (one tensor per call), or None when not installed.

    It takes a cos/sin table and one position offset per sequence, not [B, T] positions: exact
    here because the benchmark's positions are ``arange(T) + offset_b``.
    """
    try:
        from flash_attn.layers.rotary import apply_rotary_emb
    except Exception:
        return None

    def rotate(q, k, q_pos, k_pos):
        inv_freq = enc.frequencies(q_pos, k_pos)
        table = torch.arange(int(q_pos.max()) + 1, device=q.device).float().unsqueeze(-1) * inv_freq  # [P, r/2]
        cos, sin = (table.cos() * enc.attention_scaling).to(q.dtype), (table.sin() * enc.attention_scaling).to(q.dtype)
        offsets = q_pos[:, 0].to(torch.int32).contiguous()
        return (apply_rotary_emb(q, cos, sin, seqlen_offsets=offsets),
                apply_rotary_emb(k, cos, sin, seqlen_offsets=offsets))
    return rotate


def _timer(device: str):
    """ms per call: triton's do_bench on CUDA; a plain clock for the CPU smoke run (TRITON_INTERPRET=1)."""
    if device == "cuda":
        from triton.testing import do_bench
        return lambda fn, grads: do_bench(fn, warmup=25, rep=200, grad_to_none=grads)

    def clock(fn, grads):
        import time
        start = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - start)
    return clock


def run(args) -> list[dict]:
    from megafire.positional.rotary_triton import interpreting

    if torch.cuda.is_available():
        device = "cuda"
    elif interpreting():   # a smoke run of this script on tiny shapes, not a measurement
        device = "cpu"
    else:
        from megafire.config import ConfigError
        raise ConfigError("megafire bench rotary needs a CUDA GPU (or TRITON_INTERPRET=1 for a CPU smoke run)")
    time_ms = _timer(device)
    dtype = getattr(torch, DTYPES[args.dtype])
    B, hkv = args.batch, args.kv_heads or args.heads
    T = args.tokens // B
    enc, enc_fused = _encoding(args, T).to(device), _encoding(args, T).to(device).set_fused_rotary("true")
    enc.set_fused_rotary("false")
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, T, args.heads, args.head_dim, device=device, dtype=dtype, generator=gen).requires_grad_()
    k = torch.randn(B, T, hkv, args.head_dim, device=device, dtype=dtype, generator=gen).requires_grad_()
    pos = (torch.arange(T, device=device) + 17 * torch.arange(B, device=device)[:, None]).contiguous()  # [B, T]
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)

    candidates = _candidates(args, enc, enc_fused, hkv, enc.frequencies(pos, pos), device)
    torch_path = candidates[0][1]
    with torch.no_grad():
        ref_q, ref_k = torch_path(q, k, pos, pos)
    moved = 2 * (q.numel() + k.numel()) * q.element_size()   # read q, k; write q', k'
    rows: list[dict] = []
    for name, fn in candidates:
        try:
            with torch.no_grad():
                out_q, out_k = fn(q, k, pos, pos)
            err = max((out - ref).float().abs().max().item() for out, ref in ((out_q, ref_q), (out_k, ref_k)))

            def fwd():
                with torch.no_grad():
                    fn(q, k, pos, pos)

            def fwd_bwd():
                out_q, out_k = fn(q, k, pos, pos)
                torch.autograd.backward((out_q, out_k), (dq_out, dk_out))

            rows.append({"impl": name, "fwd_ms": time_ms(fwd, None), "fwd_bwd_ms": time_ms(fwd_bwd, [q, k]),
                         "max_abs_diff": err})
        except Exception as e:  # a peer that does not run here (compile, flash) is reported, not fatal
            rows.append({"impl": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
    _print_rows(rows, f"RoPE rotate q [{B}, {T}, {args.heads}, {args.head_dim}] k [{B}, {T}, {hkv}, {args.head_dim}] "
                      f"{args.dtype}, scaling={args.scaling}, rotary_dim={enc.rotary_dim}, "
                      f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU (interpreter smoke run)'}", moved)
    return rows


def _candidates(args, enc, enc_fused, kv_heads: int, inv_freq, device: str) -> list[tuple[str, object]]:
    """(name, rotate(q, k, q_pos, k_pos)) in table order; the first is the reference."""
    from megafire.positional.rotary_triton import fused_rotary, launch_config
    candidates = [("torch (reference)", enc.rotate)]
    if not args.no_compile and device == "cuda":
        candidates.append(("torch.compile", torch.compile(enc.rotate, dynamic=False)))
    flash = _flash_rotary(enc)
    if flash is not None:
        candidates.append(("flash-attn rotary", flash))
    default = launch_config(enc.rotary_dim // 2, args.heads, kv_heads)["BLOCK_T"]
    candidates.append((f"triton (block_t={default}, default)", enc_fused.rotate))
    for block_t in sorted({1, 4, 16, 32} - {default}):
        candidates.append((f"triton (block_t={block_t})", lambda q, k, qp, kp, bt=block_t:
                           fused_rotary(q, k, qp, kp, inv_freq, enc.attention_scaling, enc.rotary_dim, block_t=bt)))
    return candidates


def _print_rows(rows: list[dict], title: str, bytes_moved: int) -> None:
    base = rows[0]
    print(title)
    print(f"{'impl':<34} {'fwd ms':>8} {'GB/s':>7} {'x torch':>8} {'fwd+bwd ms':>11} {'x torch':>8} {'max |diff|':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<34} failed: {r['error']}")
            continue
        r["fwd_speedup"] = base["fwd_ms"] / r["fwd_ms"]
        r["fwd_bwd_speedup"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        print(f"{r['impl']:<34} {r['fwd_ms']:>8.3f} {bytes_moved / r['fwd_ms'] / 1e6:>7.0f} {r['fwd_speedup']:>7.2f}x "
              f"{r['fwd_bwd_ms']:>11.3f} {r['fwd_bwd_speedup']:>7.2f}x {r['max_abs_diff']:>11.2e}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    rows = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
