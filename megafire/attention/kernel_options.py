"""Launch options of the fused attention kernels as a run chooses them (``attention.fused_kernels``).

The committed options live in ``CONFIGS`` (megafire/attention/fused/_function.py): per head dim
and encoding, the tile shapes (``fwd``, ``dq``, ``dkdv``, ``onepass``: [BM, BN, warps, stages]) and
the switches of each kernel optimization (``t5_diag``, ``split_heavy``, ``rcp_ex2``, ...), each one
measured before it was turned on (docs/benchmarks.md). A run overrides them per head dim:

    attention:
      fused_kernels: {64: {t5_diag: false, split_heavy: false}}

which is the off switch of each optimization, recorded with the run's config (MLflow params, the
checkpoint's config.yaml). Precedence, lowest first: the committed entry, the run's
``attention.fused_kernels``, the ``MEGAFIRE_FUSED_CONFIGS`` environment variable (same JSON schema:
A/B runs and tuning on the device machine). Under Triton's interpreter (CPU tests) the tile shapes
stay the interpreter's own (GPU launch shapes would only make it slower); the switches and integer
options apply. ``ku`` (kinks / bucket boundaries per tile in the unrolled loops of T5 and FIRE)
is taken from here too; ``MEGAFIRE_FUSED_KU`` overrides it.

This module needs no Triton (the fused package imports it): the config is validated where it is
loaded, on any machine.
"""
from __future__ import annotations

#: head dims the kernels compile for
HEAD_DIMS = (16, 32, 64, 128)

#: what a CONFIGS entry / a head-dim object of an override may hold
LAUNCH_KEYS = ("fwd", "dq", "dkdv", "onepass")          # (BM, BN, warps, stages); onepass also false
FLAG_KEYS = ("skip", "skip_fwd", "skip_bwd", "branchless", "pres", "segment_bounds", "defer", "rcp_ex2",
             "fold_mask", "split_heavy", "t5_diag", "t5_band", "run_mask")
#: integer keys and their lowest allowed value
INT_LOW = {"onepass_min_n": 0, "run_mask_min_n": 0, "ku": 1}
INT_KEYS = tuple(INT_LOW)

_run_overrides: dict = {}


def _pow2(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


def check_config(entry: dict, where: str) -> dict:
    """One launch-config entry (``{"fwd": [64, 64, 4, 3], "defer": true, ...}``) with launch tuples as
    tuples and flags as bools; a ValueError naming ``where``, the key and what it allows for an
    unknown key or a malformed value (a typo would otherwise be ignored and an A/B time nothing)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object of launch options, got {entry!r}")
    out = {}
    for key, val in entry.items():
        if key in LAUNCH_KEYS:
            if key == "onepass" and val in (False, None):
                out[key] = None
                continue
            ok = isinstance(val, (list, tuple)) and len(val) == 4 and all(_pow2(x) for x in val[:3]) \
                and isinstance(val[3], int) and not isinstance(val[3], bool) and val[3] >= 1 and min(val[:2]) >= 16
            if not ok:
                raise ValueError(f"{where}[{key!r}] = {val!r}: a launch config is [BM, BN, warps, stages] (BM, BN "
                                 f"powers of two >= 16, warps a power of two, stages >= 1)"
                                 + (", or false" if key == "onepass" else ""))
            out[key] = tuple(val)
        elif key in FLAG_KEYS:
            if not (isinstance(val, bool) or (isinstance(val, int) and val in (0, 1))):
                raise ValueError(f"{where}[{key!r}] = {val!r}: true / false (or 1 / 0)")
            out[key] = bool(val)
        elif key in INT_KEYS:
            low = INT_LOW[key]
            if not (isinstance(val, int) and not isinstance(val, bool) and val >= low):
                raise ValueError(f"{where}[{key!r}] = {val!r}: an integer >= {low}")
            out[key] = val
        else:
            allowed = ", ".join(LAUNCH_KEYS + FLAG_KEYS + INT_KEYS)
            raise ValueError(f"{where}: unknown key {key!r}; allowed: {allowed}")
    return out


def check_overrides(data, where: str) -> dict:
    """Head dim -> launch options (``{"64": {...}}``; YAML's integer keys too) -> the checked mapping
    with string head dims, or a ValueError naming ``where``. A head dim given both ways (a YAML
    file's ``64:`` and a command line's ``--attention.fused_kernels.64.KEY``) merges, later keys winning."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object of head dims, e.g. '{{\"64\": {{\"onepass\": false}}}}', "
                         f"got {data!r}")
    dims = [str(d) for d in HEAD_DIMS]
    out = {}
    for d, entry in data.items():
        if isinstance(d, bool) or str(d) not in dims:
            raise ValueError(f"{where}: head dim {d!r} is not one of {', '.join(dims)}")
        out[str(d)] = {**out.get(str(d), {}), **check_config(entry, f"{where}[{str(d)!r}]")}
    return out


def set_run_overrides(data: dict | None) -> dict:
    """The run's ``attention.fused_kernels`` for every later kernel call of this process (checked);
    returns the previous value. The model sets it when it is built, so that each run (and each
    arm of ``megafire bench train``) gets its own, and an empty value restores the committed ones.
    A change empties dynamo's caches: a compiled block holds the kernel launches it was traced
    with, and a new model of the same shapes would otherwise reuse them (Block.forward is one code
    object for every model of the process)."""
    global _run_overrides
    prev = _run_overrides
    _run_overrides = check_overrides(data or {}, "attention.fused_kernels")
    if _run_overrides != prev:
        import torch._dynamo
        torch._dynamo.reset()
    return prev


def run_overrides(d: int) -> dict:
    """The run's checked options for head dim ``d`` ({} where none)."""
    return _run_overrides.get(str(d), {})
