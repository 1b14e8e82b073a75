"""``megafire bench tiles``: how the fused T5 / FIRE kernels would split the tiles of the trainer's
packed batches between their two loops, computed on any machine (Triton's interpreter runs
only the small table kernels; the attention kernels are recorded, not run).

Per tile the table kernel stores the range of T5 buckets / FIRE kinks its distances can reach.
A tile with at most ``KU`` bucket boundaries (T5) / kinks (FIRE) runs in the software-pipelined
loop; the first tile of a query block with more sends that tile *and every later tile of the
row* to a second, general loop (runtime kink / boundary loop, not pipelined). This prints, for
batches drawn like ``data.corpus=synthetic`` (two documents per row, positions restarting),
the live tiles (not skipped as dead), the share with at least one boundary / kink, the share
that runs in the general loop, and the mean boundaries / kinks of the tiles that have any.

Example: ``megafire bench tiles --encodings t5,fire --seqlens 512,2048 --ku 1,2 --segment-bounds 0,1``
(``--segment-bounds``: the ``segment_bounds`` launch option; ``--ku``: ``MEGAFIRE_FUSED_KU``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def tile_mix(name: str, N: int, *, ku: int = 1, segment_bounds: bool = False, B: int = 4, H: int = 12,
             D: int = 64, BM: int = 64, BN: int = 64, documents: bool = True, seed: int = 0) -> dict:
    """Counts over ``B`` synthetic rows of length ``N`` for one encoding (see module docstring).
    Must run under TRITON_INTERPRET=1 (set by ``main`` before importing the kernels)."""
    import torch

    from megafire.attention.fused import CONFIGS, _function
    from megafire.bench.attention import _build
    from megafire.train.synthetic import SyntheticBatches
    if not _function._interp():
        raise RuntimeError("megafire bench tiles runs the table kernels in Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before importing megafire.attention.fused")
    batch = SyntheticBatches(32000, seed=seed).next_batch(B, N)
    if documents:
        pos, seg = batch["positions"], batch["segment_ids"].to(torch.int32)
    else:
        pos, seg = torch.arange(N).expand(B, N).contiguous(), torch.zeros(B, N, dtype=torch.int32)
    from megafire.bench.resources import record_launches
    saved_cfg, saved_ku = CONFIGS["interp"], os.environ.get("MEGAFIRE_FUSED_KU")
    CONFIGS["interp"] = dict(saved_cfg, fwd=(BM, BN, 4, 1), dq=(BM, BN, 4, 1), dkdv=(BM, BN, 4, 1),
                             segment_bounds=segment_bounds)
    os.environ["MEGAFIRE_FUSED_KU"] = str(ku)
    try:
        q = torch.zeros(B, N, H, D)
        launches = record_launches(q, q, q, _build(name, H, D, "cpu"), pos, seg, backward=False,
                                   run=("_tile_table_kernel", "_fire_prep_kernel"))
    finally:
        CONFIGS["interp"] = saved_cfg
        if saved_ku is None:
            os.environ.pop("MEGAFIRE_FUSED_KU", None)
        else:
            os.environ["MEGAFIRE_FUSED_KU"] = saved_ku
    kernel, args, _ = next(launch for launch in launches if launch[0].fn.__name__ == "_fwd_kernel")
    fwd = dict(zip(kernel.arg_names, args))
    nqb, nkb = -(-N // BM), -(-N // BN)
    tt = fwd["TT"].view(-1, nqb, nkb)
    spl = fwd["SPL"].view(-1, nqb)
    kst = fwd["KST"].view(-1, nqb) if fwd["KST"].numel() >= nqb else torch.zeros(tt.shape[0], nqb, dtype=torch.int32)
    live = crossing = heavy = steps = 0
    for b in range(tt.shape[0]):
        for qb in range(nqb):
            last = min(nkb - 1, (qb * BM + BM - 1) // BN)   # causal: key blocks up to the diagonal
            for kb in range(int(kst[b, qb]), last + 1):
                rec = int(tt[b, qb, kb])
                span = max(((rec >> 12) & 4095) - (rec & 4095), 0)
                live += 1
                crossing += span > 0
                steps += span
                heavy += kb >= int(spl[b, qb])
    rows = tt.shape[0]
    return dict(encoding=name, N=N, ku=ku, segment_bounds=segment_bounds, documents=documents, rows=rows,
                live_tiles=live, crossing_share=crossing / max(live, 1), heavy_share=heavy / max(live, 1),
                steps_per_crossing_tile=steps / max(crossing, 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megafire bench tiles", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encodings", default="t5,fire")
    ap.add_argument("--seqlens", default="512,2048")
    ap.add_argument("--ku", default="1", help="comma list of KU values")
    ap.add_argument("--segment-bounds", default="0,1", help="comma list of 0 / 1")
    ap.add_argument("--monotone", action="store_true", help="one document per row (positions 0..N-1)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "1"   # before the kernels are imported: the table kernels run on CPU
    if "megafire.attention.fused._kernels" in sys.modules:
        raise RuntimeError("run megafire bench tiles in a fresh process (the kernels were imported compiled)")
    rows = []
    print(f"{'encoding':9s} {'N':>6s} {'KU':>3s} {'seg bounds':>10s} {'live tiles':>10s} {'crossing':>9s} "
          f"{'general loop':>12s} {'steps/tile':>10s}")
    for name in args.encodings.split(","):
        for N in [int(x) for x in args.seqlens.split(",")]:
            for ku in [int(x) for x in args.ku.split(",")]:
                for sb in [bool(int(x)) for x in args.segment_bounds.split(",")]:
                    r = tile_mix(name, N, ku=ku, segment_bounds=sb, documents=not args.monotone)
                    rows.append(r)
                    print(f"{name:9s} {N:6d} {ku:3d} {str(sb):>10s} {r['live_tiles']:10d} "
                          f"{100 * r['crossing_share']:8.1f}% {100 * r['heavy_share']:11.1f}% "
                          f"{r['steps_per_crossing_tile']:10.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
