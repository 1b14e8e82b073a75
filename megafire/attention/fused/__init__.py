"""Fused bias attention: Triton forward + backward with the position bias computed in-kernel.

``fused_bias_attention(q, k, v, encoding, q_pos, k_pos, *, causal=True, segment_ids_q=None,
segment_ids_k=None, softmax_scale=None) -> out``

* ``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]`` (GQA: ``Hq % Hkv == 0``), bf16 / fp16
  (fp32 accepted: exact-fp32 dots, for tests); ``D`` in {16, 32, 64, 128}.
* ``q_pos [Tq]`` or ``[B, Tq]``, ``k_pos [Tk]`` or ``[B, Tk]``: integer positions.
* Scores ``s_ij = scale q_i.k_j + b_h(i, j)`` (fp32; ``scale = 1/sqrt(D)`` by default),
  softmax over ``j``. ``encoding=None`` gives plain attention.
* Mask (``causal=True``): key ``j`` is visible from query ``i`` iff
  ``j <= i + (Tk - Tq)`` (index-causal, aligned to the end, so decoding with ``Tq < Tk``
  works and whole blocks above the diagonal are skipped) **and** ``k_pos[j] <= q_pos[i]``
  (position-causal) **and**, with segment ids, ``seg_q[i] == seg_k[j]``. For monotone
  positions both causal conditions coincide; for packed documents whose positions restart,
  pass segment ids. A query row with no visible key outputs 0 (and gets zero gradients).
* Gradients: ``q, k, v`` and the encoding's parameters through autograd (FIRE: MLP weights
  and biases, ``c_raw``, ``L_mult``; Kerple: raw r1/r2; T5: the bucket table; ALiBi: none).

Bias (all fp32, ``r = max(q_pos_i - k_pos_j, 0)``), every encoding **exact** (up to fp32
rounding and the hardware ``lg2.approx`` / ``ex2.approx``, relative error ~1e-7):

* ALiBi ``-m_h r``; Kerple-log ``-r1_h log(1 + r2_h r)``; Kerple-power ``-r1_h r^r2_h``.
* T5 ``W[bucket(r), h]``: one scalar per tile where the tile spans one bucket, a lookup of
  ``W[bucket(r)]`` per score near the diagonal.
* FIRE ``f_h(x)``, ``x = psi(r) / (psi(max(L, i)) + eps)``, one-hidden-layer MLP
  (``depth=1``, ``progressive=True``; other FIRE variants are not supported): ``f_h`` is
  piecewise linear between the hidden units' kinks; each tile evaluates the affine piece of
  its smallest ``x`` plus the few kinks that cross it (see ``_kernels``). Gradients of every
  MLP weight, ``c`` and ``L`` are exact (segment moments of dS, per-row sums for the
  denominators, chained to ``c_raw`` / ``L_mult`` by autograd).

``supports(encoding)`` says whether a given encoding instance can run here.
"""
from __future__ import annotations

from ._function import CONFIGS, FIRE_BINS, HEAD_DIMS, encoding_inputs, fused_bias_attention, supports

__all__ = ["fused_bias_attention", "supports", "encoding_inputs", "FIRE_BINS", "CONFIGS", "HEAD_DIMS"]
