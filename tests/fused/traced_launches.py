"""What inductor would make of every fused kernel launch, computed on a CPU machine.

Run as a script (a subprocess of tests/fused/test_fused_compile.py): it must import the kernels
*without* Triton's interpreter (inductor analyses real ``JITFunction``s), and it swaps Triton's
active driver for one that names an sm_90 GPU, so the kernels lower to TTIR here as they would
on a Hopper machine. For each encoding it

1. records the launches of one forward and one backward (``_attention_impl`` and
   ``_attention_backward_impl`` with a recording ``wrap_triton``; nothing runs);
2. lowers each launch to TTIR with Python floats typed ``fp64``, as inductor's generated
   launches type them (``torch._inductor.codegen.triton_utils.signature_of``): a kernel whose
   fp32 loop-carried values would turn fp64 fails to compile there, and here;
3. runs inductor's mutation analysis (``identify_accessed_tensors``) on it: the tensors it
   takes as written. An over-approximation (an address computed from loop-carried values)
   makes the compiled graph clone those inputs, and refuse leaf ones.

Prints one JSON object: {encoding: [[kernel name, sorted written argument names], ...]}.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megafire.bench.resources import HopperDriver  # noqa: E402


def main(names: list[str]) -> dict:
    triton.runtime.driver.set_active(HopperDriver())
    mangle = triton.runtime.jit.mangle_type
    triton.runtime.jit.mangle_type = lambda arg, *a, **k: "fp64" if isinstance(arg, float) else mangle(arg, *a, **k)

    from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors

    from fused_ref import build
    from megafire.bench.resources import record_launches

    B, T, H, HKV, D = 2, 128, 4, 2, 64
    out = {}
    for name in names:
        enc = None if name == "none" else build(name, H, D, **({"init_L": 40.0} if name == "fire" else {}))
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, T, H, D, generator=g).to(torch.bfloat16)
        k, v = [torch.randn(B, T, HKV, D, generator=g).to(torch.bfloat16) for _ in range(2)]
        seg = torch.zeros(B, T, dtype=torch.int32)
        seg[0, 70:] = 1
        launches = record_launches(q, k, v, enc, torch.arange(T), seg)
        rows = []
        for kernel, args, kwargs in launches:
            named = dict(zip(kernel.arg_names, args))
            named.update({key: val for key, val in kwargs.items() if key not in ("num_warps", "num_stages")})
            # raises on a TTIR lowering error (the fp64 typing), unlike the analysis below
            _hopper_ttir(kernel, named)
            acc = identify_accessed_tensors(kernel, named, {})
            tensors = {key for key, val in named.items() if isinstance(val, torch.Tensor)}
            rows.append([kernel.fn.__name__, sorted(dep.name for dep in acc.read_writes.writes if dep.name in tensors)])
        out[name] = rows
    return out


def _hopper_ttir(kernel, named: dict) -> None:
    from torch._higher_order_ops.triton_kernel_wrap import generate_ttir
    generate_ttir(kernel, named, {})


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
