"""Autograd wrapper around the Triton kernels; see the package docstring for the maths."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from ..kernel_options import HEAD_DIMS, LAUNCH_KEYS, check_overrides, run_overrides
from . import _kernels as K
from ._fire_tables import fire_mlp_grads, fire_tables

#: Launch configuration per head dim; "interp" is used under TRITON_INTERPRET.
#: keys: fwd (BM, BN, warps, stages), dq (BM, BN, warps, stages), dkdv (BM, BN, warps, stages).
#: branchless: FIRE's light tiles in the fwd / dkdv kernels add KU zero-weighted kink terms
#: instead of branching on the tile's kink count (default on).
#: pres: with parameter gradients in half precision, P V also adds the probabilities' rounding
#: residual (one more MMA in the forward; exact delta for the parameter gradients; default on).
#: skip: interior tiles skip the mask (a runtime branch per tile; False: mask every tile).
#: segment_bounds (T5 / FIRE with segment ids): a tile's distance bounds over the one segment its
#: two blocks share, so a key block straddling a document restart does not make the later
#: document's tiles heavy (on for T5 / FIRE at D=64, timed in the trainer; off elsewhere, untimed).
#: defer (T5): the dq kernel's heavy tiles keep per-boundary row sums in a [BM, buckets] register
#: tile and reduce them once per program (on for T5 at D=64, timed; off at D=128, untimed).
#: onepass: (BM, BN, warps, stages) of one backward kernel instead of the dq and dkdv kernels
#: (``_bwd_onepass_kernel``: a key block per program, each score's bias / P / dS computed once,
#: dQ added atomically in fp32); off where not given. Packed rows, N=2048, D=64, H12, H200 kernel
#: time (docs/benchmarks.md, 2026-12-04 "one-pass"): f+b none 1.148 -> 0.933 ms, T5 2.002 -> 1.820 at
#: 64x64 / 4 warps / 1 stage; Kerple and FIRE slower (their tiles spill at 255 registers): on at D=64
#: for none (RoPE / NoPE / absolute on packed rows), ALiBi and T5. onepass_min_n: only when the keys
#: number at least this (default 0).
#: rcp_ex2 (Kerple-log, FIRE): the ``r / (1 + c r)`` factor of the r2 / c gradient in the dq and
#: one-pass kernels as ``r 2^-lg`` (one MUFU op on the bias' own log) instead of a Newton
#: reciprocal (7 fp32 ops per score; FIRE's light dq loop 1,092 -> 881 SASS instructions per thread
#: and tile, docs/kernels.md); on for FIRE at D=64 with split_heavy (below) and for Kerple-log at D=64
#: (timed, below), off elsewhere (untimed).
#: fold_mask: a masked tile compares each score's key index once, against a per-row limit that
#: folds in the query / key bounds and the causal index condition (3 compares and 3 selects per
#: score instead of 5 and 5; the FIRE / no-bias dkdv kernels keep the five, see ``_mask``); default on (an exact
#: rewrite, prepared on a machine without a GPU: untimed; off switch for the A/B).
#: split_heavy (T5 / FIRE, two-kernel backward): the light tiles of the dq and dkdv kernels in one launch
#: each, the heavy tiles (runtime kink / bucket loops) in a second that adds the first's fp32 partials:
#: a kernel with such a loop has all its wgmma serialized by ptxas (FIRE's dq / dkdv). With KU=2
#: (99.7% of FIRE's tiles light at segment_bounds), dq 64x64 / 4 warps / 1 stage and rcp_ex2, FIRE at
#: D=64 on packed rows (N=2048, H=12, H200 kernel time) f+b 2.433 -> 2.319 ms, 125M FIRE alone in the
#: trainer at T=2048 306,092 -> 309,912 tokens/s (docs/benchmarks.md, 2026-12-05): on for FIRE at D=64.
#: t5_diag (T5): a heavy tile (next to the diagonal, ~20 bucket boundaries at 64x64) whose live scores
#: all have distance = index distance (positions contiguous inside each document: the trainer's
#: packed rows, plain rows; checked per tile, other tiles keep the boundary loop) sums its dS by
#: diagonal through a per-program scratch (BM BN fp32) into per-distance sums, O(1) per score
#: instead of one masked row sum per boundary (defer is ignored where it is on). T5 at D=64 on packed
#: rows (N=2048, H=12, H200 kernel time) f+b 1.813 -> 1.632 ms, 125M T5 alone in the trainer at T=2048
#: 357,938 -> 367,944 tokens/s (docs/benchmarks.md, 2026-12-05): on at D=64; off at D=128 (untimed).
#: t5_band (T5): on a row whose live scores all have distance = index distance (``_aligned_rows``: the
#: trainer's packed documents with restarting positions, plain rows; one flag per row, computed with the
#: position tables), the heavy tiles (next to the diagonal: a gather per score, ~660 of the forward's 1,355
#: SASS instructions per such tile at 64x64) add a per-head band tile instead (``_band_table``: the same
#: fp32 values, bit-identical scores; row-contiguous vector loads), and with t5_diag skip the per-tile
#: alignment check; other rows keep the gather. On for T5 at D=64 (timed 2026-12-05; docs/kernels.md).
#: run_mask (every encoding, causal): on the same aligned rows a masked tile keeps the key-index run
#: ``[first key of the query's segment, causal limit]`` (two compares per score against per-row bounds, no
#: key positions or segment ids: exactly the live scores there); each kernel is launched twice, for the
#: aligned rows and for the others (``_row_launches``). T5 at D=64 masks every tile: its light forward
#: tile 696 -> 497 SASS instructions per thread (docs/kernels.md). On for T5 at D=64 (with t5_band) and for
#: Kerple-log at D=64 from 1024 keys on (run_mask_min_n: shorter calls keep one launch; timed); off for the
#: other encodings (not timed there).
#: ku (T5 / FIRE): kinks / boundaries per tile in the unrolled blocks (default KU_DEFAULT, _kernels.py).
#: (D, encoding name) entries override D's; a run's ``attention.fused_kernels`` overrides both (the off
#: switch of each option, megafire.attention.kernel_options). Override for tuning:
#: MEGAFIRE_FUSED_CONFIGS='{"64": {"fwd": [128, 64, 4, 3], "skip": 0}}' (applies to every encoding).
#: Values: the fastest candidate of `python3 -m megafire.bench.attention --tune` (H100, N=4096,
#: B=4, H=16; docs/kernels.md; T5/FIRE re-tuned after the host-overhead cut of 60d3e61, whose
#: table-building ops had hidden their forward kernels); skip_fwd / skip_bwd: the mask-skip flag
#: of the fwd / bwd kernels.
CONFIGS = {
    "interp": dict(fwd=(16, 16, 4, 1), dq=(16, 16, 4, 1), dkdv=(16, 16, 4, 1), skip_fwd=True, skip_bwd=True),
    64: dict(fwd=(128, 64, 4, 3), dq=(64, 64, 4, 2), dkdv=(64, 64, 4, 2), skip_fwd=True, skip_bwd=True),
    # onepass for the no-bias kernel from N = 1024 on: 125M RoPE on packed rows +4.2% at T=2048,
    # -3.9% at T=512 (few query tiles per key block: dQ's atomics weigh more); docs/benchmarks.md
    (64, "none"): dict(dq=(64, 32, 4, 3), dkdv=(32, 128, 4, 3), onepass=(64, 64, 4, 2), onepass_min_n=1024),
    (64, "alibi"): dict(onepass=(64, 64, 4, 1)),
    128: dict(fwd=(64, 64, 4, 3), dq=(128, 64, 8, 2), dkdv=(64, 64, 4, 2), skip_fwd=True, skip_bwd=False),
    (128, "t5"): dict(fwd=(128, 128, 8, 2), skip_bwd=True),
    # T5 / FIRE at D=64: 64x64 forward tiles. At 128x64 / 4 warps both forwards spill (T5 3.4 KB per
    # thread, FIRE 0.5 KB: `megafire bench resources`); on packed rows (2 documents, N=2048, H=12,
    # the trainer's shape) T5's forward took 4.57 ms against 0.81 here, its whole training step 1.61x
    # faster (docs/benchmarks.md, 2026-12-04; `--tune --documents 2`: fastest fwd and bwd candidates)
    # defer + segment_bounds: T5 alone in the trainer (125M, packed rows, H200) 237,849 -> 349,683
    # tokens/s at T=2048 and 323,766 -> 402,868 at T=512; segment_bounds for FIRE 287,397 -> 305,605
    # and 393,483 -> 407,327 (docs/benchmarks.md, 2026-12-04 "variants"; KU=2 on top: within noise)
    # t5_band + run_mask (2026-12-05, H100, packed rows, kernel time in one call): T5 f+b 1.690 -> 1.265 ms
    # at N=2048 and 1.155 -> 0.821 at N=512 (t5_band alone 1.437 / 0.887); GPU tests against the full
    # paths pass. In the trainer that H100 was too noisy to resolve it (mean +1.8% at T=2048, repeats of
    # one arm up to 22% apart; docs/benchmarks.md 2026-12-05 "session 5")
    (64, "t5"): dict(fwd=(64, 64, 4, 3), skip_fwd=False, skip_bwd=False, defer=True, segment_bounds=True,
                     onepass=(64, 64, 4, 1), t5_diag=True, t5_band=True, run_mask=True),
    (64, "fire"): dict(fwd=(64, 64, 4, 3), segment_bounds=True, split_heavy=True, dq=(64, 64, 4, 1), rcp_ex2=True),
    # Kerple-log (2026-12-05, H100, packed rows, 2 documents, H=16, kernel time): f+b at N=2048 1.567 ms ->
    # 1.529 (run_mask) / 1.550 (rcp_ex2) / 1.495 (both); at N=512 0.696 -> 0.736 / 0.680 / 0.730: the run
    # mask from 1024 keys on. 350M kerple_log at T=2048 in the trainer, A/B in one process: +1.8% (both);
    # docs/benchmarks.md "session 8"
    (64, "kerple_log"): dict(rcp_ex2=True, run_mask=True, run_mask_min_n=1024),
    (128, "fire"): dict(skip_bwd=True),
}
# Kerple / T5 without the P-residual MMA: it is 13-15% of their fwd+bwd (N=4096, D=64) and their
# parameter gradients stay within 1e-2 of float64 without it (docs/benchmarks.md, v3.1); FIRE's
# output-layer gradient needs it
for _key in [(d, n) for d in (64, 128) for n in ("kerple_log", "kerple_power", "t5")]:
    CONFIGS.setdefault(_key, {})["pres"] = False
del _key

#: FIRE: number of bins of [0, 1] in the tile -> kink-range table
FIRE_BINS = K.FIRE_BINS

_env_cache: dict = {}

def _env_overrides(env: str) -> dict:
    """MEGAFIRE_FUSED_CONFIGS (JSON: head dim -> launch options) checked once per distinct value."""
    if env not in _env_cache:
        try:
            data = json.loads(env)
        except json.JSONDecodeError as e:
            raise ValueError(f"MEGAFIRE_FUSED_CONFIGS is not JSON ({e}): {env!r}") from None
        _env_cache[env] = check_overrides(data, "MEGAFIRE_FUSED_CONFIGS")
    return _env_cache[env]


def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def committed_config(d: int, name: str = "none") -> dict:
    """The committed launch configuration of head dim ``d`` and encoding ``name`` (no interpreter
    entry, no ``MEGAFIRE_FUSED_CONFIGS``)."""
    cfg = dict(CONFIGS.get(d, CONFIGS[128] if d > 64 else CONFIGS[64]))
    cfg.update(CONFIGS.get((d, name), {}))
    return cfg


def _apply(cfg: dict, over: dict, launch: bool = True) -> None:
    """``over`` (checked) onto ``cfg``; ``launch``: the tile shapes too (not under the interpreter)."""
    cfg.update({k: v for k, v in over.items() if launch or k not in LAUNCH_KEYS})
    if "skip" in over:  # one flag for both (tuning)
        cfg["skip_fwd"] = cfg["skip_bwd"] = bool(over["skip"])


def _config(d: int, name: str = "none") -> dict:
    """The launch options of head dim ``d`` and encoding ``name``: the committed entry, then the
    run's ``attention.fused_kernels``, then MEGAFIRE_FUSED_CONFIGS (megafire.attention.kernel_options).
    Under the interpreter its own entry, with the run's switches and integer options only."""
    if _interp():
        cfg = dict(CONFIGS["interp"])
        _apply(cfg, run_overrides(d), launch=False)
        return cfg
    cfg = committed_config(d, name)
    _apply(cfg, run_overrides(d))
    env = os.environ.get("MEGAFIRE_FUSED_CONFIGS")
    if env:
        _apply(cfg, _env_overrides(env).get(str(d), {}))
    return cfg


_NAMES = {"alibi": K.ALIBI, "kerple_log": K.KERPLE_LOG, "kerple_power": K.KERPLE_POW, "t5": K.T5, "fire": K.FIRE}


def supports(encoding) -> bool:
    """True when the fused kernels implement this encoding (bias kind, known name/options)."""
    if encoding is None:
        return True
    name = getattr(encoding, "name", None)
    if name not in _NAMES or getattr(encoding, "kind", "bias") != "bias":
        return False
    if name == "fire":
        if not getattr(encoding, "progressive", True):
            return False  # x = psi(i - j) unbounded: not implemented
        if getattr(encoding, "depth", 1) != 1:
            return False  # the exact segment tables need a one-hidden-layer MLP
    return True


_T5_LUTS: dict = {}


def _t5_tables(enc, device, traced: bool = False):
    """LUT [RT + 1] bucket of r (r clamped to RT = max_distance), THR [NB] first r of bucket k.
    They depend on the configuration alone: built once per (buckets, max distance, device);
    ``traced`` (the op's body traced by the compiler): a few ops of the graph, never cached."""
    rt = int(enc.max_distance)
    if traced:
        it = _t5_luts(enc, device, rt)
        return (it, it[:rt + 1].long()), rt
    key = (int(enc.num_buckets), rt, str(device))
    if key not in _T5_LUTS:
        it = _t5_luts(enc, device, rt)
        _T5_LUTS[key] = (it, it[:rt + 1].long())
    return _T5_LUTS[key], rt


def _t5_luts(enc, device, rt):
    """[LUT | THR] (int32) of ``_t5_tables``."""
    rel = torch.arange(rt + 1, device=device)
    from megafire.positional.t5 import t5_causal_bucket
    lut = t5_causal_bucket(rel, enc.num_buckets, enc.max_distance)
    thr = torch.searchsorted(lut.contiguous(), torch.arange(enc.num_buckets, device=device), right=False)
    return torch.cat([lut, thr]).to(torch.int32).contiguous()


#: encodings with parameters the kernels compute gradients for
LEARNED = ("kerple_log", "kerple_power", "t5", "fire")


def encoding_inputs(encoding, q_pos: torch.Tensor, Tq: int, device):
    """The encoding as the kernels take it, computed with plain torch ops (traceable: inside a
    compiled block these fuse with the rest of the graph), so the op below sees tensors only.

    Returns ``(name, params, aux, eps, use_log, t5_buckets, t5_max_distance)``:
    ``params`` the differentiable tensors (ALiBi ``[slopes]``, Kerple ``[r1, r2]``, T5
    ``[W [NB, H]]`` fp32; FIRE ``[w1, b1, W2, b2, c, den]`` with the weights as they are, fp32 or
    bf16, and ``den [Bq, Tq] = psi(max(L, i)) + eps``, differentiable in c and L);
    ``aux`` FIRE's ``[sc = (c, L), rowf = ln2 / den]`` (no grad), else empty."""
    if encoding is None:
        return "none", [], [], 0.0, True, 0, 0
    name = encoding.name
    f32 = dict(device=device, dtype=torch.float32)
    if name == "alibi":
        return name, [encoding.slopes.to(**f32)], [], 0.0, True, 0, 0
    if name in ("kerple_log", "kerple_power"):
        return name, [encoding.r1.to(**f32), encoding.r2.to(**f32)], [], 0.0, True, 0, 0
    if name == "t5":
        weight = encoding.relative_attention_bias.weight.to(**f32)       # [NB, H]
        return name, [weight], [], 0.0, True, int(encoding.num_buckets), int(encoding.max_distance)
    if name == "fire":
        if encoding.depth != 1 or not encoding.progressive:
            raise ValueError("fused FIRE needs depth=1 and progressive=True")
        w1, b1 = encoding.mlp[0].weight.reshape(-1), encoding.mlp[0].bias
        W2, b2 = encoding.mlp[-1].weight, encoding.mlp[-1].bias
        c, L = encoding.c.reshape(()), encoding.L.reshape(())
        use_log, eps = bool(encoding.use_log), float(encoding.eps)
        # per-row denominators (ties i == L split like torch.maximum)
        ieff = torch.maximum(q_pos.to(torch.float32), L)
        den = ((torch.log1p(c * ieff) if use_log else ieff) + eps).reshape(-1, Tq)   # [Bq, Tq]
        sc = torch.stack([c.detach(), L.detach()]).float()
        rowf = ((K.LN2 if use_log else 1.0) / den.detach()).contiguous()
        return name, [w1, b1, W2, b2, c, den], [sc, rowf], eps, use_log, 0, 0
    raise ValueError(f"fused attention does not support encoding {name!r}")


def _pos(p: torch.Tensor, B: int, T: int, name: str) -> tuple[torch.Tensor, int]:
    if p.dim() == 1:
        if p.shape[0] != T:
            raise ValueError(f"{name} has length {p.shape[0]}, expected {T}")
        return p.to(torch.int32).contiguous(), 0
    if p.dim() == 2 and p.shape[1] == T and p.shape[0] in (1, B):
        p = p.to(torch.int32).contiguous()
        return p, (T if p.shape[0] == B else 0)
    raise ValueError(f"{name} must be [T] or [B, T], got {tuple(p.shape)}")


_POSITIONS: dict = {}
_POSITIONS_SIZE = 8


def _by_identity(cache: dict, size: int, tensors: tuple, extra: tuple, build):
    """``build()``, cached in ``cache`` (at most ``size`` entries, oldest out first) by the tensors'
    identity and version counters plus ``extra``: every layer of a step passes the same tensors. The
    cache holds the tensors, so their ids cannot be reused meanwhile; inference tensors (no version
    counter), fake ones and traced calls are not cached."""
    key = None
    if not torch.compiler.is_compiling() and not any(t.is_inference() or is_fake(t) for t in tensors):
        key = tuple((id(t), t._version) for t in tensors) + extra
        hit = cache.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], tensors)):
            return hit[1]
    val = build()
    if key is not None:
        if len(cache) >= size:
            cache.pop(next(iter(cache)))
        cache[key] = (tensors, val)
    return val


def _positions(p: torch.Tensor, B: int, T: int, name: str):
    """(int32 positions, batch stride, suffix min, prefix max) of a position tensor, computed once per
    step for all layers (``_by_identity``)."""
    def build():
        p32, sb = _pos(p, B, T, name)
        return (p32, sb, *_bounds(p32))
    return _by_identity(_POSITIONS, _POSITIONS_SIZE, (p,), (B, T), build)


def position_tables(q_pos: torch.Tensor, k_pos: torch.Tensor, B: int, Tq: int, Tk: int) -> list[torch.Tensor]:
    """``[qp, qmin, kp, kmax]``: int32 positions ([T] or [B, T]), the queries' suffix minima and
    the keys' prefix maxima, what the kernels read (the tile tables take per-block bounds,
    ``_block_bounds``). Inside a compiled graph they are a few traced ops (every layer's graph
    computes them; the identity cache below cannot see through the graph's inputs); eagerly,
    they come from that cache (one computation per step for all layers)."""
    if torch.compiler.is_compiling():
        qp = _pos(q_pos, B, Tq, "q_pos")[0]
        qmin, qmax = _bounds(qp)
        if k_pos is q_pos:
            return [qp, qmin, qp, qmax]
        kp = _pos(k_pos, B, Tk, "k_pos")[0]
        return [qp, qmin, kp, _bounds(kp)[1]]
    qp, _, qmin, _qmax = _positions(q_pos, B, Tq, "q_pos")
    kp, _, _kmin, kmax = _positions(k_pos, B, Tk, "k_pos")
    return [qp, qmin, kp, kmax]


def _batch_stride(p: torch.Tensor, B: int) -> int:
    """Elements between rows of a [B, T] int32 table; 0 for one row shared by the batch."""
    return p.shape[1] if p.dim() == 2 and p.shape[0] == B else 0


def _bounds(p: torch.Tensor):
    """(suffix min, prefix max) along the last dim, int32."""
    pmax = torch.cummax(p, -1).values
    smin = torch.cummin(p.flip(-1), -1).values.flip(-1)
    return smin.contiguous(), pmax.contiguous()


_DUMMIES: dict = {}


def _dummy(device, dtype=torch.float32, traced: bool = False):
    """A placeholder for a pointer argument the launch's constexpr branches never touch: one
    cached tensor per (device, dtype), so a call makes no allocation or fill for them (in a
    traced body, an empty tensor of the graph: a cached real tensor cannot enter a fake trace)."""
    if traced:
        return torch.empty(4, device=device, dtype=dtype)
    key = (str(device), dtype)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(4, device=device, dtype=dtype)
    return _DUMMIES[key]


class _State:
    """Non-differentiable launch state of one call, rebuilt from the op's inputs in forward and in
    backward (the position tables are inputs, the encoding's tables the forward's outputs)."""


def _state(q, k, pos, seg_q, seg_k, name, params, aux, tables, causal, scale, eps, use_log,
           t5_buckets, t5_max_distance) -> _State:
    B, dev = q.shape[0], q.device
    st = _State()
    st.traced = is_fake(q)
    st.name, st.mode = name, _NAMES.get(name, K.NONE)
    st.W, st.NS, st.RT, st.eps, st.use_log = 1, 1, 0, eps, use_log
    st.causal, st.scale = bool(causal), float(scale)
    st.prec = "ieee" if q.dtype == torch.float32 else "tf32"
    st.qp, st.qmin, st.kp, st.kmax = pos[:4]
    st.has_seg = seg_q is not None
    st.sq, st.sk = (seg_q, seg_k) if st.has_seg else (st.qp, st.kp)
    st.strides = tuple(_batch_stride(p, B) for p in (st.qp, st.kp, st.sq, st.sk))
    d = _dummy(dev, traced=st.traced)
    st.dummy_i, st.dummy_f = _dummy(dev, torch.int32, st.traced), d
    st.p0 = params[0] if st.mode in (K.ALIBI, K.KERPLE_LOG, K.KERPLE_POW) else d
    st.p1 = params[1] if st.mode in (K.KERPLE_LOG, K.KERPLE_POW) else d
    st.ft, st.it, st.sc, st.rowf = d, st.dummy_i, d, d
    cfg = _config(q.shape[-1], name)
    # the rows' alignment flags (and first keys) came with the position tables (``with_row_flags``)
    st.aln = pos[4] if len(pos) > 4 else st.dummy_i
    st.seglo = pos[5] if len(pos) > 5 else st.dummy_i
    st.run = len(pos) > 4 and st.causal and bool(option_for(cfg, "run_mask", k.shape[1]))
    st.band = False
    if st.mode == K.T5:
        it, st.RT = _t5_tables_for(t5_buckets, t5_max_distance, dev, st.traced)
        st.NS, st.ft, st.it = t5_buckets, tables[0], it
        # t5_band; past a max distance of 2048 the band tables (~RT / 64 tiles of BM BN fp32 per head)
        # would outgrow L2: the gather then
        st.band = len(pos) > 4 and bool(cfg.get("t5_band", False)) and st.RT <= 2048
    elif st.mode == K.FIRE:
        st.ft, st.it, st.rank = tables
        st.W = int(params[0].numel())
        st.NS = st.W + 1
        st.sc, st.rowf = aux
    st.table = st.mode in (K.T5, K.FIRE)
    # tile bounds over the one segment two blocks share (packed documents; CONFIGS "segment_bounds")
    st.segb = st.table and st.has_seg and bool(cfg.get("segment_bounds", False))
    # kinks / bucket boundaries per tile handled by unrolled blocks in the pipelined loops
    # (more: the tile runs in the second, general loop): CONFIGS / the run's "ku", else KU_DEFAULT;
    # MEGAFIRE_FUSED_KU overrides for tests / tuning
    ku = cfg.get("ku", K.KU_DEFAULT.get(name, 1))
    st.ku = int(os.environ.get("MEGAFIRE_FUSED_KU", ku)) if st.table else 1
    # one tile table per batch row when positions or segments differ between rows
    st.tab_bsz = B if any(st.strides) else 1
    st.tab_b = 1 if st.tab_bsz > 1 else 0
    st.tables = {}
    return st


_ROW_TABLES: dict = {}
_ROW_TABLES_SIZE = 8


def _rows(t: Tensor, rows: int, T: int) -> Tensor:
    """A [T] or [1 | rows, T] table as [rows, T] (a view)."""
    return t.reshape(-1, T).expand(rows, T)


def _aligned_rows(qp: Tensor, kp: Tensor, sq: Optional[Tensor], sk: Optional[Tensor], Tq: int, Tk: int) -> Tensor:
    """int32 [rows] (rows: 1, or B where any of the tables has a row per batch element): 1 where every
    live score of the row has distance = index distance plus ``Tk - Tq``, ``qpos_i - kpos_j = i - j +
    Tk - Tq``, and its segments are runs, which ``t5_band`` and ``run_mask`` need. Sufficient and checked
    here: the keys' positions step by one inside each segment (a segment id that changes must grow:
    ids that come back, e.g. ``0 1 0``, would pair runs whose positions need not line up) and the
    queries' positions and ids are the keys' last Tq. The trainer's rows pass (positions restart at
    each packed document or run 0..T-1; segment ids count the documents); a row that fails keeps the
    exact per-score paths."""
    tabs = (qp, kp) + ((sq, sk) if sq is not None else ())
    rows = max(t.reshape(-1, t.shape[-1]).shape[0] for t in tabs)

    k2 = _rows(kp, rows, Tk)
    ok = k2[:, 1:] == k2[:, :-1] + 1                                           # [rows, Tk - 1]
    if sq is not None:
        s2 = _rows(sk, rows, Tk)
        ok = (ok & (s2[:, 1:] == s2[:, :-1])) | (s2[:, 1:] > s2[:, :-1])
    flag = ok.all(1)
    if Tq > Tk:
        flag = torch.zeros_like(flag)
    else:
        flag = flag & (_rows(qp, rows, Tq) == k2[:, Tk - Tq:]).all(1)
        if sq is not None:
            flag = flag & (_rows(sq, rows, Tq) == s2[:, Tk - Tq:]).all(1)
    return flag.to(torch.int32).contiguous()


def _first_keys(sk: Tensor, rows: int, Tq: int, Tk: int) -> Tensor:
    """int32 [rows, Tq]: for each query (the keys' last Tq) the index of the first key of its segment
    (the start of its run of equal segment ids), what ``run_mask`` bounds a row's live keys with."""
    s2 = _rows(sk, rows, Tk)
    idx = torch.arange(Tk, device=sk.device, dtype=torch.int32).expand(rows, Tk)
    change = F.pad(s2[:, 1:] != s2[:, :-1], (1, 0), value=True)
    first = torch.cummax(torch.where(change, idx, 0), 1).values                 # [rows, Tk]
    return first[:, Tk - Tq:].to(torch.int32).contiguous()


def _row_tables(qp: Tensor, kp: Tensor, sq: Optional[Tensor], sk: Optional[Tensor], Tq: int, Tk: int,
                first: bool) -> list[Tensor]:
    """``[flags]`` (``_aligned_rows``), ``[flags, first keys]`` with ``first`` and segment ids; eagerly
    once per step for all layers (``_by_identity``), traced a few ops of the graph."""
    def build():
        flag = _aligned_rows(qp, kp, sq, sk, Tq, Tk)
        return [flag, _first_keys(sk, flag.shape[0], Tq, Tk)] if first and sk is not None else [flag]
    tabs = (qp, kp) + ((sq, sk) if sq is not None else ())
    return _by_identity(_ROW_TABLES, _ROW_TABLES_SIZE, tabs, (Tq, Tk, first), build)


def option_for(cfg: dict, option: str, Tk: int):
    """``cfg[option]`` for a call with ``Tk`` keys, or None: an option with a ``{option}_min_n`` entry
    (``onepass_min_n``, ``run_mask_min_n``) holds only from that many keys on."""
    return (cfg.get(option) or None) if Tk >= int(cfg.get(f"{option}_min_n", 0)) else None


def with_row_flags(pos: list[Tensor], seg_q: Optional[Tensor], seg_k: Optional[Tensor], name: str, D: int, Tq: int,
                   Tk: int, causal: bool = True) -> list[Tensor]:
    """The op's position tables (``position_tables``), plus what ``t5_band`` (T5) and ``run_mask`` (causal)
    read, where they are on: the rows' alignment flags (``_aligned_rows``) and, with segment ids and
    ``run_mask``, each query's first key (``_first_keys``). The op's state finds them there."""
    cfg = _config(D, name)
    band = name == "t5" and cfg.get("t5_band", False)
    run = causal and bool(option_for(cfg, "run_mask", Tk))
    if not (band or run):
        return pos
    return [*pos, *_row_tables(pos[0], pos[2], seg_q, seg_k, Tq, Tk, bool(run))]


_BAND_IDX: dict = {}


def _band_table(st, H: int, Tq: int, Tk: int, BM: int, BN: int, trans: bool = False):
    """``(BT, BD, NT, BG)`` of ``t5_band`` for a BM x BN launch (``_band_tile``): BT [H, NT, BM, BN] fp32
    (``trans``: [H, NT, BN, BM], the dkdv kernel's keys x queries) with ``BT[h, t, i, j] = W[h,
    bucket(clamp(BD + t BG + i - j, 0, RT))]``, the table values the gather reads (FT's first
    ``H (RT + 1)``, not yet times log2 e). A tile's index distance at its first row and column is
    ``d0 = m0 - n0 + Tk - Tq``, a multiple of BG = gcd(BM, BN) away from ``Tk - Tq``; the bands run
    from the last ``d0`` whose tile is all ``r <= 0`` to the first all ``r >= RT`` (both constant,
    so the kernel clamps ``t``). T5 at 64x64, RT = 128: NT = 5, 960 KB for 12 heads (L2-resident).
    Dummies without ``t5_band``. The index tensor is cached per geometry (eagerly), the gather is one
    op per call and geometry."""
    if not st.band:
        return st.dummy_f, 0, 1, 16
    key = ("band", BM, BN, trans)
    if key not in st.tables:
        G, off, RT = math.gcd(BM, BN), Tk - Tq, st.RT
        k0 = -(-(off + BM - 1) // G)                   # BD = off - G k0: the last d0 with d0 + BM - 1 <= 0
        k1 = max(-(-(RT + BN - 1 - off) // G), -k0)    # off + G k1: the first d0 with d0 - (BN - 1) >= RT
        bd, nt = off - G * k0, k0 + k1 + 1
        dev = st.ft.device
        ikey = (BM, BN, trans, bd, G, nt, RT, str(dev))
        idx = None if st.traced else _BAND_IDX.get(ikey)
        if idx is None:
            d = bd + G * torch.arange(nt, device=dev)
            r = d[:, None, None] + torch.arange(BM, device=dev)[:, None] - torch.arange(BN, device=dev)[None, :]
            idx = r.clamp(0, RT)                                              # [NT, BM, BN]
            if trans:
                idx = idx.transpose(1, 2)
            idx = idx.contiguous()
            if not st.traced:
                if len(_BAND_IDX) >= 16:         # decoding: one entry per Tk - Tq
                    _BAND_IDX.pop(next(iter(_BAND_IDX)))
                _BAND_IDX[ikey] = idx
        tabr = st.ft[:H * (RT + 1)].view(H, RT + 1)
        st.tables[key] = (tabr[:, idx].contiguous(), bd, nt, G)
    return st.tables[key]


def _t5_tables_for(num_buckets: int, max_distance: int, device, traced: bool = False):
    """(IT = [LUT | THR] int32, RT) of a T5 configuration (cached; see ``_t5_tables``)."""
    enc = _T5Config(num_buckets, max_distance)
    (it, _lut), rt = _t5_tables(enc, device, traced)
    return it, rt


@dataclass(frozen=True)
class _T5Config:
    num_buckets: int
    max_distance: int


def _t5_forward_table(weight: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """FT = [W[bucket(r), h] for r = 0..RT (by head) | W^T] (fp32) of the T5 table ``weight`` [NB, H]."""
    (_it, lut), _rt = _t5_tables(_T5Config(num_buckets, max_distance), weight.device, is_fake(weight))
    return torch.cat([weight[lut].t().reshape(-1), weight.t().reshape(-1)]).contiguous()


def _row_launches(st) -> tuple:
    """``(RUN, PICK)`` of each launch of a kernel: one for every row, or with ``run_mask`` one for the
    aligned rows (the run mask) and one for the others (the full mask; on the trainer's rows all of
    its programs return at once). One kernel holding both masks behind a runtime branch compiles
    worse than either (``_pick``)."""
    return ((True, True), (False, True)) if st.run else ((False, False),)


def _forward(q, k, v, st, pgrad: bool):
    """The forward launch: (o, ores, lse); ``ores`` (the fp32 output's rounding residual, kept
    for exact parameter gradients) is empty when not needed."""
    B, Tq, H, D = q.shape
    Tk, HKV = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    resid = pgrad and q.dtype != torch.float32
    ores = torch.empty_like(q) if resid else o
    lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
    cfg = _config(D, st.name)
    BM, BN, warps, stages = cfg["fwd"]
    nqb, nkb = triton_cdiv(Tq, BM), triton_cdiv(Tk, BN)
    tt, ta, spl, _spc = _tile_tables(st, H, Tq, Tk, BM, BN)
    kst, _qen = _live_ranges(st, Tq, Tk, BM, BN)
    bt, bd, nt, bg = _band_table(st, H, Tq, Tk, BM, BN)
    pres = resid and bool(cfg.get("pres", True))
    for run, pick in _row_launches(st):
        wrap_triton(K._fwd_kernel)[(nqb, B * H)](
            q, k, v, o, ores, lse, st.qp, st.kp, st.sq, st.sk, st.qmin, st.kmax,
            st.p0, st.p1, st.ft, st.it, st.sc, st.rowf, tt, ta, spl, kst, bt, st.aln, st.seglo,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            *st.strides, st.tab_b, H, H // HKV, Tq, Tk, st.W, st.NS, st.RT, nqb, nkb, st.scale * K.LOG2E, bd, nt,
            BIAS=st.mode, CAUSAL=st.causal, HAS_SEG=st.has_seg, USE_LOG=st.use_log, FAST=not K.INTERPRET,
            DOT_PREC=st.prec, SKIP=bool(cfg["skip_fwd"]), RESID=resid, PRES=pres, TABLE=st.table, KU=st.ku,
            BRANCHLESS=bool(cfg.get("branchless", True)), FOLD=bool(cfg.get("fold_mask", True)), D=D, BM=BM, BN=BN,
            BAND=st.band, BG=bg, RUN=run, PICK=pick, num_warps=warps, num_stages=stages)
    return o, (ores if resid else q.new_empty(0)), lse


def _backward(do, q, k, v, o, ores, lse, st, params, pgrad: bool):
    """The backward launches: (dq, dk, dv, extras), ``extras`` the parameter-gradient sums
    that ``_param_grads`` turns into gradients (empty without ``pgrad``): Kerple / T5 ``[tot
    [H, stride]]``; FIRE ``[dw1, db1, dW2, db2, rowc [B, H, Tq], rowx [B, H, Tq]]``."""
    B, Tq, H, D = q.shape
    Tk, HKV = k.shape[1], k.shape[2]
    do = do.contiguous()
    dev = q.device
    mode = st.mode
    resid = ores.numel() > 0
    delta = torch.empty(B, H, Tq, device=dev, dtype=torch.float32)
    wrap_triton(K._bwd_delta_kernel)[(triton_cdiv(Tq, 64), B * H)](
        o, ores if resid else o, do, delta, o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2), H, Tq, RESID=resid, D=D, BM=64, num_warps=4)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    pgrad = pgrad and mode in (K.KERPLE_LOG, K.KERPLE_POW, K.T5, K.FIRE)
    cfg = _config(D, st.name)
    onepass = option_for(cfg, "onepass", Tk)
    BM, BN, warps, stages = onepass or cfg["dq"]
    W, NS = st.W, st.NS
    # parameter-sum rows: one per (batch, head, query block) of the dq kernel, or per key block
    # of the one-pass kernel
    nprog = triton_cdiv(Tk, BN) if onepass else triton_cdiv(Tq, BM)
    # T5 with t5_diag: per-distance sums [2 NS, 2 NS + RT] after the bucket / boundary sums
    # (a max distance past 1023 would hold RT + 1 fp32 lanes in registers: the boundary loop instead)
    diag = pgrad and mode == K.T5 and bool(cfg.get("t5_diag", False)) and st.RT < 1024
    rtp = max(16, 1 << st.RT.bit_length()) if diag else 16               # a power of two > RT
    w2 = 1 << (BM + BN - 2).bit_length() if diag else 16                  # >= BM + BN - 1 diagonals
    part_stride = 2 * NS + 2 * W if mode == K.FIRE else 2 * NS + (st.RT + 1) * diag if mode == K.T5 else 2
    part = torch.zeros(B * H * nprog, part_stride, device=dev, dtype=torch.float32) if pgrad else st.dummy_f
    if pgrad and mode == K.FIRE:
        new_row = torch.zeros if onepass else torch.empty   # the one-pass kernel adds per key block
        rowc = new_row(B, H, Tq, device=dev, dtype=torch.float32)
        rowx = new_row(B, H, Tq, device=dev, dtype=torch.float32)
    else:
        rowc = rowx = st.dummy_f
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2), *st.strides)
    common = dict(BIAS=mode, CAUSAL=st.causal, HAS_SEG=st.has_seg, USE_LOG=st.use_log, FAST=not K.INTERPRET,
                  DOT_PREC=st.prec, SKIP=bool(cfg["skip_bwd"]), TABLE=st.table, KU=st.ku, D=D,
                  FOLD=bool(cfg.get("fold_mask", True)))
    tabs = (st.qp, st.kp, st.sq, st.sk, st.qmin, st.kmax, st.p0, st.p1, st.ft, st.it, st.sc, st.rowf)
    nsp = max(16, 1 << (NS - 1).bit_length())
    defer = bool(cfg.get("defer", False)) and not diag
    rcp_ex2 = bool(cfg.get("rcp_ex2", False))
    nqb, nkb = triton_cdiv(Tq, BM), triton_cdiv(Tk, BN)
    tt, ta, spl, spc = _tile_tables(st, H, Tq, Tk, BM, BN)
    kst, qen = _live_ranges(st, Tq, Tk, BM, BN)
    # t5_diag's per-program scratch: a dS tile and its diagonal sums (each written before it is read)
    scr = torch.empty((nkb * B * HKV if onepass else nqb * B * H) * (BM * BN + w2), device=dev,
                      dtype=torch.float32) if diag else st.dummy_f
    if onepass:
        # fp32 dQ summed over the key blocks' programs (atomics), in q's [B, Tq, H, D] strides
        dqa = torch.zeros(q.shape, device=dev, dtype=torch.float32)
        bt, bd, nt, bg = _band_table(st, H, Tq, Tk, BM, BN)
        for run, pick in _row_launches(st):
            wrap_triton(K._bwd_onepass_kernel)[(nkb, B * HKV)](
                q, k, v, do, dqa, dk, dv, lse, delta, *tabs, tt, ta, spc, qen, part, rowc, rowx, scr, bt, st.aln,
                st.seglo, *strides, st.tab_b, H, HKV, H // HKV, Tq, Tk, W, NS, st.RT, nqb, nkb, st.scale * K.LOG2E, st.scale,
                part_stride, bd, nt, PGRAD=pgrad, BM=BM, BN=BN, NSP=nsp, DEFER=defer, RCP_EX2=rcp_ex2, DIAG=diag,
                RTP=rtp, W2=w2, BAND=st.band, BG=bg, RUN=run, PICK=pick, num_warps=warps, num_stages=stages,
                **common)
        dq = dqa.to(q.dtype)
    else:
        dq = torch.empty_like(q)
        # split_heavy (T5 / FIRE): light tiles in a launch of their own (phase 1, fp32 partials), the heavy
        # tiles' runtime kink / bucket loops in a second (phase 2, adds the partials): ptxas serializes
        # every wgmma of a kernel holding such a loop
        phases = (1, 2) if st.table and cfg.get("split_heavy", False) else (0,)
        dqp = st.dummy_f
        bt, bd, nt, bg = _band_table(st, H, Tq, Tk, BM, BN)
        for phase in phases:
            out = torch.empty_like(q, dtype=torch.float32) if phase == 1 else dq
            for run, pick in _row_launches(st):
                wrap_triton(K._bwd_dq_kernel)[(nqb, B * H)](
                    q, k, v, do, out, dqp, lse, delta, *tabs, tt, ta, spl, kst, part, rowc, rowx, scr, bt, st.aln,
                    st.seglo, *strides, st.tab_b, H, H // HKV, Tq, Tk, W, NS, st.RT, nqb, nkb, st.scale * K.LOG2E, st.scale,
                    part_stride, bd, nt, PGRAD=pgrad, BM=BM, BN=BN, NSP=nsp, DEFER=defer, RCP_EX2=rcp_ex2,
                    PHASE=phase, DIAG=diag, RTP=rtp, W2=w2, BAND=st.band, BG=bg, RUN=run, PICK=pick, num_warps=warps,
                    num_stages=stages, **common)
            if phase == 1:
                dqp = out
        BM, BN, warps, stages = cfg["dkdv"]
        nqb, nkb = triton_cdiv(Tq, BM), triton_cdiv(Tk, BN)
        tt, ta, _spl, spc = _tile_tables(st, H, Tq, Tk, BM, BN)
        _kst, qen = _live_ranges(st, Tq, Tk, BM, BN)
        dkp = dvp = st.dummy_f
        bt, bd, nt, bg = _band_table(st, H, Tq, Tk, BM, BN, trans=True)
        for phase in phases:
            pk, pv = (torch.empty_like(k, dtype=torch.float32), torch.empty_like(v, dtype=torch.float32)) \
                if phase == 1 else (dk, dv)
            for run, pick in _row_launches(st):
                wrap_triton(K._bwd_dkdv_kernel)[(nkb, B * HKV)](
                    q, k, v, do, pk, pv, dkp, dvp, lse, delta, *tabs, tt, ta, spc, qen, bt, st.aln, st.seglo,
                    *strides, st.tab_b, H, HKV, H // HKV, Tq, Tk, W, NS, st.RT, nqb, nkb, st.scale * K.LOG2E,
                    st.scale, bd, nt, BRANCHLESS=bool(cfg.get("branchless", True)), PHASE=phase, BM=BM, BN=BN,
                    BAND=st.band, BG=bg, RUN=run, PICK=pick, num_warps=warps, num_stages=stages, **common)
            if phase == 1:
                dkp, dvp = pk, pv
    if not pgrad:
        return dq, dk, dv, []
    tot = part.view(B, H, nprog, part_stride).sum((0, 2))  # [H, part_stride]
    if diag:
        tot = _t5_fold_distances(tot, NS, st.it, st.RT)
    if mode != K.FIRE:
        return dq, dk, dv, [tot]
    w1, b1, W2 = params[:3]
    return dq, dk, dv, [*fire_mlp_grads(tot, w1, b1, W2, st.rank), rowc, rowx]   # one launch (_fire_tables.py)


def _t5_fold_distances(tot: Tensor, NS: int, it: Tensor, RT: int) -> Tensor:
    """T5 with t5_diag: ``tot`` [H, 2 NS + RT + 1] (bucket base sums, boundary sums, per-distance
    sums for r = 0..RT) -> [H, 2 NS] with each distance's sum added to its bucket's base sum.
    Buckets are runs of distances (``THR[k]`` the first of bucket k), so a bucket's share is a
    difference of the distances' prefix sums: fixed order (no scatter atomics), in float64."""
    thr = it[RT + 1:RT + 1 + NS].long()                                      # [NS] first distance per bucket
    edges = torch.cat([thr, thr.new_full((1,), RT + 1)])                     # [NS + 1]
    cs = F.pad(tot[:, 2 * NS:].double().cumsum(1), (1, 0))                   # [H, RT + 2]
    per_bucket = (cs[:, edges[1:]] - cs[:, edges[:-1]]).to(tot.dtype)        # [H, NS]
    return torch.cat([tot[:, :NS] + per_bucket, tot[:, NS:2 * NS]], 1)


def _param_grads(name: str, params, extras, use_log: bool) -> list:
    """Gradients of ``params`` (encoding_inputs) from the backward's sums, in plain torch ops
    (traced into the compiled backward); cast to each parameter's dtype."""
    if not extras:
        return [None] * len(params)
    if name == "kerple_log":
        tot, (r1, _r2) = extras[0], params
        grads = [-K.LN2 * tot[:, 0], -r1 * tot[:, 1]]
    elif name == "kerple_power":
        tot, (r1, _r2) = extras[0], params
        grads = [-tot[:, 0], -r1 * K.LN2 * tot[:, 1]]
    elif name == "t5":
        tot = extras[0]
        NS = tot.shape[1] // 2
        base, G = tot[:, :NS], tot[:, NS:]
        grads = [(base + G - F.pad(G[:, 1:], (0, 1))).t()]   # G[:, 0] is 0
    else:   # fire: the MLP's gradients, and those of the per-row denominators (chained to c and L)
        dw1, db1, dW2, db2, rowc, rowx = extras
        c, den = params[4], params[5]
        rc, rx = rowc.sum(1), rowx.sum(1)                    # [B, Tq]
        if den.shape[0] == 1:
            rc, rx = rc.sum(0, keepdim=True), rx.sum(0, keepdim=True)
        dc = (rc / den).sum() if use_log else torch.zeros((), device=den.device)
        grads = [dw1, db1, dW2, db2, dc.reshape(c.shape), -rx / den]
    return [g.to(p.dtype) for g, p in zip(grads, params)]


def _tile_tables(st, H: int, Tq: int, Tk: int, BM: int, BN: int):
    """Per-tile scalars of the BM x BN launch geometry (T5, FIRE; see ``_tile_table_kernel``)
    and the heavy-tile splits per query block (SPL) and key block (SPC), built once per
    geometry and call (one small launch); dummies for the other encodings."""
    if not st.table:
        return st.dummy_i, st.dummy_f, st.dummy_i, st.dummy_i
    key = (BM, BN)
    if key not in st.tables:
        nqb, nkb = triton_cdiv(Tq, BM), triton_cdiv(Tk, BN)
        bt = st.tab_bsz
        dev = st.qp.device
        tt = torch.empty(bt * nqb * nkb, device=dev, dtype=torch.int32)
        ta = torch.empty(bt * H * nqb * nkb * 2, device=dev, dtype=torch.float32)
        spl = torch.full((bt * nqb,), nkb, device=dev, dtype=torch.int32)
        spc = torch.zeros(bt * nkb, device=dev, dtype=torch.int32)
        blk = 16 if K.INTERPRET else 256
        qlo, qhi, qb_sb = _block_bounds(st.qp, Tq, BM)
        klo, khi, kb_sb = _block_bounds(st.kp, Tk, BN)
        sqlo, sqhi, sqb_sb, sklo, skhi, skb_sb = _segment_bounds(st, Tq, Tk, BM, BN)
        if st.segb:
            qsb, qsb_ps, qsb_sb = _segment_position_bounds(st.qp, st.sq, sqlo, sqhi, Tq, BM)
            ksb, ksb_ps, ksb_sb = _segment_position_bounds(st.kp, st.sk, sklo, skhi, Tk, BN)
        else:
            qsb = ksb = st.dummy_i
            qsb_ps = qsb_sb = ksb_ps = ksb_sb = 0
        wrap_triton(K._tile_table_kernel)[(triton_cdiv(nqb * nkb, blk), bt)](
            qlo, qhi, klo, khi, sqlo, sqhi, sklo, skhi, st.ft, st.it, st.sc, tt, ta, spl, spc,
            qb_sb, kb_sb, sqb_sb, skb_sb, H, Tq, Tk, st.NS, st.RT, K.FIRE_BINS, nqb, nkb, st.eps, st.ku,
            qsb, ksb, qsb_ps, qsb_sb, ksb_ps, ksb_sb,
            BIAS=st.mode, CAUSAL=st.causal, HAS_SEG=st.has_seg, USE_LOG=st.use_log, BM=BM, BN=BN, BLK=blk,
            SEGB=st.segb, num_warps=4)
        st.tables[key] = (tt, ta, spl, spc)
    return st.tables[key]


def _segment_bounds(st, Tq: int, Tk: int, BM: int, BN: int):
    """``(sqlo, sqhi, sq_row_stride, sklo, skhi, sk_row_stride)``: the segment ids' min / max per
    query block and per key block (``_block_bounds``); dummies without segment ids."""
    if not st.has_seg:
        return st.dummy_i, st.dummy_i, 0, st.dummy_i, st.dummy_i, 0
    key = ("seg", BM, BN)
    if key not in st.tables:
        st.tables[key] = (*_block_bounds(st.sq, Tq, BM), *_block_bounds(st.sk, Tk, BN))
    return st.tables[key]


def _live_ranges(st, Tq: int, Tk: int, BM: int, BN: int):
    """``(KST [tab rows * nqb], QEN [tab rows * nkb])`` int32 for the BM x BN geometry, with segment
    ids: the first key block whose segment range meets each query block's, and one past the
    last query block whose range meets each key block's (``nkb`` / ``0`` where none does).
    Tiles outside these ranges are fully masked (disjoint segment ranges hold no equal pair), so
    the kernels' loops skip them: with packed documents, every tile of a later document's
    queries against an earlier document's keys. Dummies without segment ids (nothing skipped)."""
    if not st.has_seg:
        return st.dummy_i, st.dummy_i
    key = ("live", BM, BN)
    if key not in st.tables:
        nqb, nkb = triton_cdiv(Tq, BM), triton_cdiv(Tk, BN)
        sqlo, sqhi, _, sklo, skhi, _ = _segment_bounds(st, Tq, Tk, BM, BN)
        meets = (sklo[:, None, :] <= sqhi[:, :, None]) & (skhi[:, None, :] >= sqlo[:, :, None])  # [rows, nqb, nkb]
        meets = meets.expand(st.tab_bsz, nqb, nkb).to(torch.int32)
        kst = torch.where(meets.amax(2) > 0, meets.argmax(2), nkb)                 # first live key block
        qen = torch.where(meets.amax(1) > 0, nqb - meets.flip(1).argmax(1), 0)     # one past the last live
        st.tables[key] = (kst.to(torch.int32).reshape(-1).contiguous(), qen.to(torch.int32).reshape(-1).contiguous())
    return st.tables[key]


def _segment_position_bounds(p: torch.Tensor, s: torch.Tensor, smin: torch.Tensor, smax: torch.Tensor, T: int,
                             bs: int):
    """``(bounds [4, rows, nb] int32, plane stride, row stride)``: per block of ``bs``, the min / max
    of the positions ``p`` over the entries whose segment id ``s`` is the block's smallest ``smin``
    (its first segment), then over those whose id is its largest ``smax`` (its last); ``smin`` /
    ``smax`` are ``_block_bounds`` of ``s``. Rows as in ``_block_bounds`` (``p`` may be shared by
    every row). Padding of a ragged last block takes neither role."""
    nb = triton_cdiv(T, bs)
    ps, ss = p.reshape(-1, T), s.reshape(-1, T)
    rows = max(ps.shape[0], ss.shape[0])
    pad = nb * bs - T
    pp = F.pad(ps.expand(rows, T), (0, pad)).view(rows, nb, bs)
    # padding takes id -1: no block's min / max (a real id -1 in the block would only widen its bounds)
    sv = F.pad(ss.expand(rows, T), (0, pad), value=-1).view(rows, nb, bs)
    big = 2 ** 31 - 1
    out = []
    for sid in (smin.expand(rows, nb), smax.expand(rows, nb)):                # [rows, nb]
        mine = sv == sid[..., None]
        out += [torch.where(mine, pp, big).amin(-1), torch.where(mine, pp, -big).amax(-1)]
    bounds = torch.stack(out).to(torch.int32).contiguous()                    # [4, rows, nb]
    return bounds, rows * nb, (nb if rows > 1 else 0)


def _block_bounds(p: torch.Tensor, T: int, bs: int):
    """(min, max, row stride) of an int32 table ([T] or [rows, T]) over each block of ``bs``
    along its last dim: ``[rows, cdiv(T, bs)]`` int32 each (a ragged last block is padded with
    values that neither bound takes)."""
    nb = triton_cdiv(T, bs)
    rows = p.reshape(-1, T)
    pad = nb * bs - T
    lo = F.pad(rows, (0, pad), value=2 ** 31 - 1).view(-1, nb, bs).amin(-1)
    hi = F.pad(rows, (0, pad), value=-2 ** 31).view(-1, nb, bs).amax(-1)
    return lo.contiguous(), hi.contiguous(), (nb if rows.shape[0] > 1 else 0)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# --- the registered ops ----------------------------------------------------------------------
# The same forward and backward bodies, registered twice with the autograd formula on the forward:
# * ``megafire::fused_bias_attention[_backward]`` (torch.library.triton_op): torch.compile traces
#   *into* the body, so inductor sees the Triton kernels (through ``wrap_triton``) and launches them
#   from its own generated code, and the tables around them (FIRE's kink tables, the tile tables,
#   the parameter-gradient sums) become ops of the block's graph. The Python body never runs in a
#   compiled step: its host cost (~0.5 ms forward, ~0.9 ms backward per layer, docs/benchmarks.md)
#   is gone. Needs real Triton (a GPU): the interpreter's kernels cannot be traced.
# * ``megafire::fused_bias_attention_opaque[_backward]`` (torch.library.custom_op): an opaque call in
#   the graph whose Python body launches the kernels. Used under TRITON_INTERPRET (CPU tests) and
#   when asked for (``inline=False``; ``perf.inline_kernels=false``).
# An autograd.Function with Python-side state would instead break the compiled graph.

def _attention_impl(q: Tensor, k: Tensor, v: Tensor, pos: list[Tensor], seg_q: Optional[Tensor],
                    seg_k: Optional[Tensor], params: list[Tensor], aux: list[Tensor], name: str, causal: bool,
                    scale: float, eps: float, use_log: bool, t5_buckets: int, t5_max_distance: int,
                    pgrad: bool) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """-> (o [B, Tq, H, D], ores (o's rounding residual, or empty), lse [B, H, Tq], tables): the
    encoding's derived tables (FIRE ``[ft, it, rank]``, T5 ``[ft]``), kept for the backward."""
    if name == "fire":
        w1, b1, W2, b2 = params[:4]
        tables = list(fire_tables(w1, b1, W2, b2, K.FIRE_BINS))
    elif name == "t5":
        tables = [_t5_forward_table(params[0], t5_buckets, t5_max_distance)]
    else:
        tables = []
    st = _state(q, k, pos, seg_q, seg_k, name, params, aux, tables, causal, scale, eps, use_log,
                t5_buckets, t5_max_distance)
    o, ores, lse = _forward(q, k, v, st, pgrad)
    return o, ores, lse, tables


def _attention_fake(q, k, v, pos, seg_q, seg_k, params, aux, name, causal, scale, eps, use_log,
                    t5_buckets, t5_max_distance, pgrad):
    B, Tq, H, _D = q.shape
    ores = torch.empty_like(q) if pgrad and q.dtype != torch.float32 else q.new_empty(0)
    lse = q.new_empty(B, H, Tq, dtype=torch.float32)
    if name == "fire":
        Hh, W = params[2].shape
        tables = [q.new_empty(2 * Hh * (W + 1) + Hh * W + W, dtype=torch.float32),
                  q.new_empty(2 * K.FIRE_BINS, dtype=torch.int32), q.new_empty(W, dtype=torch.int32)]
    elif name == "t5":
        nb, Hh = params[0].shape
        tables = [q.new_empty((t5_max_distance + 1) * Hh + nb * Hh, dtype=torch.float32)]
    else:
        tables = []
    return torch.empty_like(q), ores, lse, tables


def _attention_backward_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, ores: Tensor, lse: Tensor,
                             pos: list[Tensor], seg_q: Optional[Tensor], seg_k: Optional[Tensor],
                             params: list[Tensor], aux: list[Tensor], tables: list[Tensor], name: str, causal: bool,
                             scale: float, eps: float, use_log: bool, t5_buckets: int, t5_max_distance: int,
                             pgrad: bool) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """-> (dq, dk, dv, extras) (``_backward``)."""
    st = _state(q, k, pos, seg_q, seg_k, name, params, aux, tables, causal, scale, eps, use_log,
                t5_buckets, t5_max_distance)
    return _backward(do, q, k, v, o, ores, lse, st, params, pgrad)


def _attention_backward_fake(do, q, k, v, o, ores, lse, pos, seg_q, seg_k, params, aux, tables, name,
                             causal, scale, eps, use_log, t5_buckets, t5_max_distance, pgrad):
    grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    if not pgrad or name not in LEARNED:
        return (*grads, [])
    H = q.shape[2]
    f32 = dict(dtype=torch.float32)
    if name in ("kerple_log", "kerple_power"):
        return (*grads, [q.new_empty(H, 2, **f32)])
    if name == "t5":
        return (*grads, [q.new_empty(H, 2 * t5_buckets, **f32)])
    W = params[0].numel()
    B, Tq = q.shape[:2]
    return (*grads, [q.new_empty(W, **f32), q.new_empty(W, **f32), q.new_empty(H, W, **f32), q.new_empty(H, **f32),
                     q.new_empty(B, H, Tq, **f32), q.new_empty(B, H, Tq, **f32)])


#: the op's arguments after the tensors (q, k, v, pos, segments, params, aux): (name, causal,
#: scale, eps, use_log, t5_buckets, t5_max_distance, pgrad)
_SAVED_ARGS = slice(8, None)


def _setup_context(ctx, inputs, output):
    q, k, v, pos, seg_q, seg_k, params, aux = inputs[:8]
    o, ores, lse, tables = output
    ctx.static = inputs[_SAVED_ARGS]
    ctx.counts = (len(pos), len(params), len(aux), len(tables))
    ctx.has_seg = seg_q is not None
    ctx.save_for_backward(q, k, v, o, ores, lse, *pos, *((seg_q, seg_k) if ctx.has_seg else ()),
                          *params, *aux, *tables)


def _autograd_formula(backward_op):
    """The registered backward of a forward op: ``backward_op`` (the matching registration) for
    the kernels, then the parameter-gradient algebra in plain ops."""
    def _attention_backward(ctx, do, _dores, _dlse, _dtables):
        saved = list(ctx.saved_tensors)
        q, k, v, o, ores, lse = saved[:6]
        n_pos, n_params, n_aux, _n_tables = ctx.counts
        pos, rest = saved[6:6 + n_pos], saved[6 + n_pos:]
        seg_q, seg_k = (rest[0], rest[1]) if ctx.has_seg else (None, None)
        rest = rest[2:] if ctx.has_seg else rest
        params, aux, tables = rest[:n_params], rest[n_params:n_params + n_aux], rest[n_params + n_aux:]
        name, causal, scale, eps, use_log, t5_buckets, t5_max_distance, pgrad = ctx.static
        dq, dk, dv, extras = backward_op(do, q, k, v, o, ores, lse, pos, seg_q, seg_k, params, aux, tables, name,
                                         causal, scale, eps, use_log, t5_buckets, t5_max_distance, pgrad)
        # one entry per input, lists as lists (the registered autograd checks the structure)
        return (dq, dk, dv, [None] * n_pos, None, None, _param_grads(name, params, extras, use_log),
                [None] * n_aux, None, None, None, None, None, None, None, None)
    return _attention_backward


def _register(name: str, inline: bool):
    """(forward op, backward op) registered as ``megafire::<name>[_backward]``."""
    if inline:
        fwd = torch.library.triton_op(f"megafire::{name}", mutates_args=())(_attention_impl)
        bwd = torch.library.triton_op(f"megafire::{name}_backward", mutates_args=())(_attention_backward_impl)
    else:
        fwd = torch.library.custom_op(f"megafire::{name}", mutates_args=())(_attention_impl)
        fwd.register_fake(_attention_fake)
        bwd = torch.library.custom_op(f"megafire::{name}_backward", mutates_args=())(_attention_backward_impl)
        bwd.register_fake(_attention_backward_fake)
    fwd.register_autograd(_autograd_formula(bwd), setup_context=_setup_context)
    return fwd, bwd


_inline_op, _inline_backward_op = _register("fused_bias_attention", inline=True)
_opaque_op, _opaque_backward_op = _register("fused_bias_attention_opaque", inline=False)


def fused_bias_attention(q, k, v, encoding, q_pos, k_pos, *, causal: bool = True,
                         segment_ids_q=None, segment_ids_k=None, softmax_scale: Optional[float] = None,
                         fire_grid: Optional[int] = None, inline: bool = True):
    """Attention with a position bias computed inside Triton kernels (see package docstring).

    Traceable by torch.compile (one graph with the caller's ops). ``inline`` (default): the
    kernels are launched by inductor's generated code inside the compiled graph
    (``megafire::fused_bias_attention``, a triton_op); ``inline=False``, or under Triton's
    interpreter: they run inside two opaque custom ops. Eagerly both are the same call.
    ``fire_grid`` is accepted for compatibility with v1 (FIRE interpolation grid) and ignored:
    FIRE is now exact."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Tq, H, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or H % k.shape[2]:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)} (Hq must be a multiple of Hkv)")
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} not supported {HEAD_DIMS}")
    if (segment_ids_q is None) != (segment_ids_k is None):
        raise ValueError("give both segment_ids_q and segment_ids_k, or neither")
    if not supports(encoding):
        raise ValueError(f"fused attention does not support encoding {getattr(encoding, 'name', encoding)!r}")
    if encoding is not None and getattr(encoding, "num_heads_local", H) != H:
        raise ValueError(f"encoding has {encoding.num_heads_local} local heads, q has {H}")
    Tk = k.shape[1]
    pos = position_tables(q_pos, k_pos, B, Tq, Tk)
    seg_q = seg_k = None
    if segment_ids_q is not None:
        seg_q = _pos(segment_ids_q, B, Tq, "segment_ids_q")[0]
        seg_k = seg_q if segment_ids_k is segment_ids_q else _pos(segment_ids_k, B, Tk, "segment_ids_k")[0]
    name, params, aux, eps, use_log, t5_buckets, t5_max_distance = encoding_inputs(encoding, q_pos, Tq, q.device)
    pos = with_row_flags(pos, seg_q, seg_k, name, D, Tq, Tk, causal)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    # parameter gradients are sums of dS: keep the fp32 output's rounding residual for delta
    pgrad = torch.is_grad_enabled() and name in LEARNED and any(p.requires_grad for p in params)
    op = _inline_op if inline and not _interp() else _opaque_op
    o, _ores, _lse, _tables = op(
        q.contiguous(), k.contiguous(), v.contiguous(), pos, seg_q, seg_k, params, aux,
        name, bool(causal), scale, eps, use_log, t5_buckets, t5_max_distance, pgrad)
    return o
