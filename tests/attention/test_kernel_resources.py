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

from megafire.bench.resources import parse_ptxas

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


def _run(tmp_path, encodings, configs=None):
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("Triton's ptxas is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEGAFIRE_FUSED_CONFIGS")}
    if configs:
        env["MEGAFIRE_FUSED_CONFIGS"] = json.dumps(configs)
    out = tmp_path / f"rows{len(list(tmp_path.iterdir()))}.json"
    done = subprocess.run([sys.executable, "-m", "megafire.cli", "bench", "resources", "--encodings", encodings,
                           "--head-dims", "64", "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {(r["encoding"], r["kernel"]): r for r in json.loads(out.read_text())}


def test_committed_forward_configs_do_not_spill(tmp_path):
    rows = _run(tmp_path, "t5,fire")
    # T5's committed D=64 backward is the one-pass kernel (CONFIGS onepass), FIRE's the dq + dkdv pair
    assert {k for e, k in rows if e == "t5"} == {"_fwd_kernel", "_bwd_onepass_kernel"}
    assert {k for e, k in rows if e == "fire"} == {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"}
    for enc in ("t5", "fire"):
        fwd = rows[(enc, "_fwd_kernel")]
        assert (fwd["BM"], fwd["BN"]) == (64, 64)
        assert fwd["spill_stores"] == 0 and fwd["stack"] == 0, fwd
        assert 0 < fwd["registers"] <= 255
    # the old config: the tool reports its spills
    old = _run(tmp_path, "t5", {"64": {"fwd": [128, 64, 4, 3], "skip": 1}})[("t5", "_fwd_kernel")]
    assert (old["BM"], old["BN"], old["warps"]) == (128, 64, 4)
    assert old["spill_stores"] > 1000 and old["registers"] == 255, old
