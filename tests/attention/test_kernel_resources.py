"""``megafire bench resources``: the fused kernels compiled for sm_90 on this CPU machine and ptxas'
register / spill report, against the committed launch configs.

Why it is a test: a kernel at the 255-register limit that spills keeps tile state in local memory
inside its key loop; T5's forward at 128x64 / 4 warps spilled 3.4 KB per thread and ran 5.7x
slower on packed rows (docs/benchmarks.md, 2026-12-04). The committed D=64 forwards of T5 and
FIRE must compile without spills, and the tool must see the spill of the old config (else the
first check could not fail).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megafire.bench.resources import parse_ptxas, sass_loops

# triton is imported inside the tests, not here: collected before tests/fused/conftest.py sets
# TRITON_INTERPRET=1, a module-level import of triton made the fused CPU tests mix interpreted
# kernels with compiled helpers ("Cannot call @triton.jit'd outside of the scope of a kernel")

PTXAS_SAMPLE = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _fwd_kernel
    1680 bytes stack frame, 3420 bytes spill stores, 2236 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1680 bytes cumulative stack size
"""


def test_parse_ptxas_reads_registers_and_spills():
    r = parse_ptxas(PTXAS_SAMPLE)
    assert (r["registers"], r["spill_stores"], r["spill_loads"], r["stack"]) == (255, 3420, 2236, 1680)
    assert not r["serialized_wgmma"]
    assert parse_ptxas("ptxas info    : Used 128 registers")["spill_stores"] == 0


#: FIRE's D=64 backward before 2026-12-05 (the two kernels, each one launch, Newton reciprocal, KU=1):
#: the baseline the options below are measured against
FIRE_OLD = {"split_heavy": False, "rcp_ex2": False, "dq": [64, 64, 4, 2]}


def _run(tmp_path, encodings, configs=None, sass=False, ku=None):
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("Triton's ptxas is not installed")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "MEGAFIRE_FUSED_CONFIGS", "MEGAFIRE_FUSED_KU")}
    if configs:
        env["MEGAFIRE_FUSED_CONFIGS"] = json.dumps(configs)
    if ku:
        env["MEGAFIRE_FUSED_KU"] = str(ku)
    out = tmp_path / f"rows{len(list(tmp_path.iterdir()))}.json"
    done = subprocess.run([sys.executable, "-m", "megafire.cli", "bench", "resources", "--encodings", encodings,
                           "--head-dims", "64", "--json", str(out),
                           *(["--sass", str(tmp_path / "sass")] if sass else [])],
                          capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {(r["encoding"], r["kernel"]): r for r in json.loads(out.read_text())}


def test_committed_forward_configs_do_not_spill(tmp_path):
    rows = _run(tmp_path, "t5,fire")
    # T5's committed D=64 backward is the one-pass kernel (CONFIGS onepass), FIRE's the dq + dkdv pair,
    # each launched for the light tiles (.1) and the heavy ones (.2: split_heavy)
    assert {k for e, k in rows if e == "t5"} == {"_fwd_kernel", "_bwd_onepass_kernel"}
    assert {k for e, k in rows if e == "fire"} == {"_fwd_kernel", "_bwd_dq_kernel.1", "_bwd_dq_kernel.2",
                                                   "_bwd_dkdv_kernel.1", "_bwd_dkdv_kernel.2"}
    for enc in ("t5", "fire"):
        fwd = rows[(enc, "_fwd_kernel")]
        assert (fwd["BM"], fwd["BN"]) == (64, 64)
        assert fwd["spill_stores"] == 0 and fwd["stack"] == 0, fwd
        assert 0 < fwd["registers"] <= 255
    # the old config: the tool reports its spills
    old = _run(tmp_path, "t5", {"64": {"fwd": [128, 64, 4, 3], "skip": 1}})[("t5", "_fwd_kernel")]
    assert (old["BM"], old["BN"], old["warps"]) == (128, 64, 4)
    assert old["spill_stores"] > 1000 and old["registers"] == 255, old


SASS_SAMPLE = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_2:
        /*0010*/                   FFMA R2, R3, R4, R5 ;
        /*0020*/              @!P0 MUFU.EX2 R2, R2 ;
.L_x_1:
        /*0030*/                   FSEL R6, R2, RZ, P1 ;
        /*0040*/                   FADD.FTZ R7, R6, R7 ;
        /*0050*/               @P2 BRA `(.L_x_1) ;
        /*0060*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0070*/               @P3 BRA `(.L_x_2) ;
        /*0080*/                   EXIT ;
.L_x_3:
        /*0090*/                   BRA `(.L_x_3);
"""


def test_sass_loops_reads_nested_loops():
    """Backward branches are loops (outer 0x10-0x70 holding inner 0x30-0x50); opcodes without
    predicates and modifiers; the padding branch after EXIT is not a loop."""
    loops = sass_loops(SASS_SAMPLE)
    assert [(lp["start"], lp["end"], lp["instructions"]) for lp in loops] == [(0x10, 0x70, 7), (0x30, 0x50, 3)]
    assert loops[0]["ops"] == {"FFMA": 1, "MUFU": 1, "FSEL": 1, "FADD": 1, "BRA": 2, "HGMMA": 1}


def _tile_loops(rows, kernel):
    """The tile loops of a kernel (bodies of over 500 instructions; runtime kink loops are ~110)."""
    return [lp for lp in rows[("fire", kernel)]["loops"] if lp["instructions"] > 500]


def test_rcp_ex2_and_fold_mask_in_the_compiled_code(tmp_path):
    """What the two options change in FIRE's compiled D=64 kernels (sm_90a SASS): ``rcp_ex2`` puts one
    MUFU op per score (32 per thread and 64x64 tile) in place of the Newton reciprocal's ~7 FMA-pipe
    ops (each dq tile loop at least 150 instructions shorter); the folded mask (default) drops two
    selects per score from every masked tile of the forward and dq kernels (64 per thread and loop).
    Measured on the unsplit kernels (``FIRE_OLD``: one dq launch holding both tile loops)."""
    base = _run(tmp_path, "fire", {"64": FIRE_OLD}, sass=True, ku=1)
    ex2 = _run(tmp_path, "fire", {"64": {**FIRE_OLD, "rcp_ex2": True}}, sass=True, ku=1)
    unfolded = _run(tmp_path, "fire", {"64": {**FIRE_OLD, "fold_mask": False}}, sass=True, ku=1)
    assert (tmp_path / "sass" / "fire_64__bwd_dq_kernel.sass").exists()
    b, e = _tile_loops(base, "_bwd_dq_kernel"), _tile_loops(ex2, "_bwd_dq_kernel")
    assert len(b) == len(e) == 2, (b, e)   # light (pipelined) and heavy tile loops
    for lb, le in zip(b, e):
        assert le["ops"]["MUFU"] - lb["ops"]["MUFU"] == 32, (lb["ops"], le["ops"])
        assert lb["instructions"] - le["instructions"] >= 150, (lb["instructions"], le["instructions"])
    for kernel in ("_fwd_kernel", "_bwd_dq_kernel"):
        f, u = _tile_loops(base, kernel), _tile_loops(unfolded, kernel)
        assert len(f) == len(u) == 2, (kernel, f, u)
        for lf, lu in zip(f, u):
            assert lu["ops"]["FSEL"] - lf["ops"]["FSEL"] >= 60, (kernel, lf["ops"], lu["ops"])
            assert lf["instructions"] < lu["instructions"], kernel


def test_split_heavy_lifts_the_wgmma_serialization(tmp_path):
    """ptxas serializes every wgmma of FIRE's unsplit dq and dkdv kernels (``FIRE_OLD``: the heavy
    tiles' runtime kink loops; in dq also the pipelined light loop). With ``split_heavy`` (light and
    heavy tiles in separate launches) and a one-stage dq loop (FIRE's committed D=64 config), none of
    the four backward launches is serialized."""
    base = _run(tmp_path, "fire", {"64": FIRE_OLD}, ku=1)
    assert base[("fire", "_bwd_dq_kernel")]["serialized_wgmma"]
    assert base[("fire", "_bwd_dkdv_kernel")]["serialized_wgmma"]
    split = _run(tmp_path, "fire")
    kernels = {k for _e, k in split}
    assert kernels == {"_fwd_kernel", "_bwd_dq_kernel.1", "_bwd_dq_kernel.2", "_bwd_dkdv_kernel.1",
                       "_bwd_dkdv_kernel.2"}, kernels
    assert not any(r["serialized_wgmma"] for r in split.values()), split


def test_t5_diag_sums_diagonals_in_registers(tmp_path):
    """``t5_diag`` (T5's heavy tiles summed by diagonal): the skewed read back of the dS tile (64
    loads per thread and tile at 64x64) runs along the diagonals in memory order, so each thread
    owns whole diagonals and sums their rows in registers. Laid out the other way (rows across the
    lanes, as the first version compiled) the one-pass heavy tile loop gained ~340 shuffles."""
    base = _run(tmp_path, "t5", {"64": {"t5_diag": False}}, sass=True)[("t5", "_bwd_onepass_kernel")]["loops"]
    diag = _run(tmp_path, "t5", sass=True)[("t5", "_bwd_onepass_kernel")]["loops"]   # committed: on
    hb, hd = base[0], diag[0]   # the heavy query tiles run first in a key block's program
    assert hb["instructions"] > 500 and hd["instructions"] > 500, (base, diag)
    assert hd["ops"].get("LDG", 0) - hb["ops"].get("LDG", 0) >= 64, (hb["ops"], hd["ops"])
    assert hd["ops"].get("SHFL", 0) - hb["ops"].get("SHFL", 0) < 100, (hb["ops"], hd["ops"])
