"""``megafire bench resources``: what the fused attention kernels cost in registers, compiled for a
Hopper GPU on any machine (no GPU needed).

For each encoding and head dim it records the launches of one forward and one backward of
``fused_bias_attention`` (nothing runs: Triton's driver is swapped for one that names an sm_90
GPU), compiles each attention kernel with the launch configuration the run would use (the
committed ``CONFIGS``, or ``MEGAFIRE_FUSED_CONFIGS``), assembles its PTX with the ``ptxas``
that Triton ships (``-v``) and prints registers per thread, spill stores / loads and stack
frame bytes per kernel. A kernel at the 255-register limit that spills keeps part of its tile
state in local memory (L1 / L2 round trips inside the key loop): on packed rows (two documents)
T5's forward at 128x64 / 4 warps spilled 3.4 KB per thread and ran 5.7x slower than at 64x64
(docs/benchmarks.md, 2026-12-04). Use it before timing candidates on a GPU.

Example: ``megafire bench resources --encodings t5,fire --head-dims 64,128``.

``--sass DIR`` also disassembles each kernel (``nvdisasm``, shipped with Triton), writes
``DIR/<encoding>_<D>_<kernel>.sass`` and prints, per loop (a backward branch: the key / query tile
loops and the runtime kink / bucket loops inside them), its static instruction count per thread and
the count of the main opcodes. The static count of a tile loop includes its guarded blocks (mask,
kinks, segment flushes); what one tile costs on its common path is the loop minus the blocks it
branches over (the ``.sass`` file has the labels). The counts rank kernels and changes before they
are timed (FIRE / no-bias f+b time 2.85x, their per-tile common-path counts ~3.1x at N=2048 on packed
rows); latency sets the absolute time (4.5-6x the issue time; docs/kernels.md).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

ATTENTION_KERNELS = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_onepass_kernel")


class HopperDriver:
    """The part of a Triton driver that compiling for a target asks for."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _ptxas(tool: str = "ptxas") -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{tool} not found at {path} (Triton's NVIDIA backend ships it)")
    return path


_SASS_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def _opcode(text: str) -> str:
    """``@!P2 FSEL.FTZ R1, ...`` -> ``FSEL`` (predicate and modifiers dropped)."""
    text = re.sub(r"^@!?U?P\w+\s+", "", text)
    return text.split()[0].split(".")[0]


def sass_loops(sass: str) -> list[dict]:
    """Loops of an ``nvdisasm -c`` listing: one per backward branch (a ``BRA`` to a label at or before
    it), as ``{start, end, instructions, ops}`` (byte offsets, the static instruction count of the
    body, a Counter of its opcodes), in address order; a body may contain inner loops."""
    labels, pending, instrs = {}, [], []
    for line in sass.splitlines():
        m = _SASS_LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _SASS_INSTR.match(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            instrs.append((addr, m.group(2).strip()))
    spans = set()
    for addr, text in instrs:
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", text)
        if m and labels.get(m.group(1), addr) < addr:   # (a branch to itself: the padding after EXIT)
            spans.add((labels[m.group(1)], addr))
    loops = []
    for lo, hi in sorted(spans):
        ops = collections.Counter(_opcode(t) for a, t in instrs if lo <= a <= hi)
        loops.append(dict(start=lo, end=hi, instructions=sum(ops.values()), ops=ops))
    return loops


def parse_ptxas(text: str) -> dict:
    """ptxas -v output -> {registers, spill_stores, spill_loads, stack} (bytes; 0 when absent)."""
    def num(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0
    return dict(registers=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"),
                serialized_wgmma="wgmma.mma_async instructions are serialized" in text)


def record_launches(q, k, v, encoding, pos, seg, *, backward: bool = True, run: tuple = ()) -> list:
    """``(JITFunction, args, kwargs)`` of every kernel launch of one fused forward (and backward)
    of ``encoding`` on ``q, k, v`` ([B, T, H, D]) with positions ``pos`` and segment ids ``seg``
    (or None), recorded without running them; kernels named in ``run`` (e.g. the table kernels)
    are launched for real, so the later launches get their actual tables. The fused package's
    ``wrap_triton`` is swapped for the call and restored after."""
    from megafire.attention.fused import _fire_tables, _function
    launches: list = []
    real = _function.wrap_triton

    def wrap(kernel):
        if kernel.fn.__name__ in run:
            return real(kernel)

        class Record:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append((kernel, args, kwargs))
        return Record()

    saved = _function.wrap_triton, _fire_tables.wrap_triton
    _function.wrap_triton = _fire_tables.wrap_triton = wrap
    try:
        B, N, _, D = q.shape
        nm, params, aux, eps, use_log, nb, md = _function.encoding_inputs(encoding, pos, N, q.device)
        pt = _function.position_tables(pos, pos, B, N, k.shape[1])
        pt = _function.with_row_flags(pt, seg, seg, nm, D, N, k.shape[1])
        static = (nm, True, D ** -0.5, eps, use_log, nb, md, nm in _function.LEARNED)
        o, ores, lse, tables = _function._attention_impl(q, k, v, pt, seg, seg, params, aux, *static)
        if backward:
            _function._attention_backward_impl(torch.randn_like(q), q, k, v, o, ores, lse, pt, seg, seg, params,
                                               aux, tables, *static)
    finally:
        _function.wrap_triton, _fire_tables.wrap_triton = saved
    return launches


def _launches(name: str, D: int, N: int, H: int, documents: int) -> list:
    """The launches of one forward and one backward on ``documents`` packed documents (B=1)."""
    from megafire.bench.attention import _build, packed_positions
    q, k, v = [torch.randn(1, N, H, D).to(torch.bfloat16) for _ in range(3)]
    pos, seg = packed_positions(1, N, documents, "cpu")
    return record_launches(q, k, v, _build(name, H, D, "cpu"), pos, seg)


def resources(name: str, D: int, *, N: int = 512, H: int = 2, documents: int = 2,
              sass_dir: str | None = None) -> list[dict]:
    """One row per attention kernel of encoding ``name`` at head dim ``D``: the launch config and
    ptxas' resource usage for sm_90a; with ``sass_dir``, also its loops (``sass_loops``) and its
    listing written there."""
    import triton
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("megafire bench resources compiles real kernels: unset TRITON_INTERPRET")
    drivers = triton.runtime.driver
    saved = getattr(drivers, "_active", None)   # None on a machine without a GPU driver
    drivers.set_active(HopperDriver())
    rows = []
    try:
        for kernel, args, kwargs in _launches(name, D, N, H, documents):
            kname = kernel.fn.__name__
            if kname not in ATTENTION_KERNELS:
                continue
            warps, stages = kwargs.get("num_warps", 4), kwargs.get("num_stages", 2)
            const = {key: val for key, val in kwargs.items() if key not in ("num_warps", "num_stages")}
            compiled = kernel.warmup(*args, grid=(1,), num_warps=warps, num_stages=stages, **const)
            named = dict(zip(kernel.arg_names, args), **const)
            with tempfile.TemporaryDirectory() as tmp:
                ptx = os.path.join(tmp, "k.ptx")
                with open(ptx, "w") as f:
                    f.write(compiled.asm["ptx"])
                cubin = os.path.join(tmp, "k.cubin")
                out = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", ptx, "-o", cubin],
                                     capture_output=True, text=True, check=True)
                listing = subprocess.run([_ptxas("nvdisasm"), "-c", "-g", cubin], capture_output=True, text=True,
                                         check=True).stdout if sass_dir else ""
            if named.get("PHASE"):   # split_heavy: the light (1) and heavy (2) launches of one kernel
                kname = f"{kname}.{named['PHASE']}"
            row = dict(encoding=name, D=D, kernel=kname, BM=named.get("BM"), BN=named.get("BN"),
                       warps=warps, stages=stages, **parse_ptxas(out.stderr))
            if listing:
                row["loops"] = [dict(lp, ops=dict(lp["ops"])) for lp in sass_loops(listing)]
                if sass_dir:
                    os.makedirs(sass_dir, exist_ok=True)
                    with open(os.path.join(sass_dir, f"{name}_{D}_{kname}.sass"), "w") as f:
                        f.write(listing)
            rows.append(row)
    finally:
        drivers._active = saved
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megafire bench resources", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encodings", default="none,alibi,kerple_log,kerple_power,t5,fire")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--documents", type=int, default=2, help="packed rows (the trainer's HAS_SEG kernels)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--sass", default=None, metavar="DIR",
                    help="disassemble each kernel into DIR and print its loops' instruction counts")
    args = ap.parse_args(argv)
    rows = []
    print(f"{'encoding':13s} {'D':>4s} {'kernel':17s} {'tile':>8s} {'warps':>5s} {'stg':>3s} {'regs':>5s} "
          f"{'spill st':>8s} {'spill ld':>8s} {'stack':>6s}  wgmma")
    for D in [int(x) for x in args.head_dims.split(",")]:
        for name in args.encodings.split(","):
            for r in resources(name, D, documents=args.documents, sass_dir=args.sass):
                rows.append(r)
                print(f"{r['encoding']:13s} {r['D']:4d} {r['kernel']:17s} {r['BM']:>4}x{r['BN']:<3} {r['warps']:5d} "
                      f"{r['stages']:3d} {r['registers']:5d} {r['spill_stores']:8d} {r['spill_loads']:8d} "
                      f"{r['stack']:6d}  {'serialized' if r['serialized_wgmma'] else ''}", flush=True)
                for lp in r.get("loops", []):
                    top = ", ".join(f"{op} {n}" for op, n in collections.Counter(lp["ops"]).most_common(8))
                    print(f"{'':19s}loop {lp['start']:#07x}-{lp['end']:#07x}: {lp['instructions']:5d} instructions "
                          f"({top})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
