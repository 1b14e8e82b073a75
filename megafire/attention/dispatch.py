"""Backend selection: ``attention.backend`` x encoding kind x device -> an attention function.

Every backend has the signature of :func:`megafire.attention.reference.reference_attention`::

    fn(q, k, v, encoding, q_pos, k_pos, *, causal, segment_ids_q, segment_ids_k, softmax_scale)

``auto``: on CUDA, bias encodings use ``fused`` when the fused kernels support the encoding,
otherwise ``reference``. Encodings without a bias (RoPE after its rotation, NoPE, absolute) use
``sdpa/fused`` on CUDA: a choice per call, :func:`sdpa_or_fused_attention` (packed documents ->
the fused kernels with no bias term, which skip the tiles where two documents cannot see each
other, where SDPA's boolean mask computes them on a slower path; one document -> SDPA-flash with
``is_causal``); ``sdpa`` on CPU. ``attention.backend=sdpa`` or ``fused`` fixes either choice.
``flex`` (torch FlexAttention, :mod:`megafire.attention.flex`) is only used when asked for: compiled on CUDA; on CPU it runs
forward only (torch has no CPU FlexAttention backward; a gradient there is a ConfigError at
the call). Explicit choices that cannot work raise :class:`~megafire.config.ConfigError`
naming ``attention.backend``, the reason and the alternatives. The resolved choice is logged
once per (requested backend, encoding, device type).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from megafire.config import ConfigError
from megafire.positional.base import PositionalEncoding

from .reference import reference_attention
from .sdpa import sdpa_attention

BACKENDS = ("auto", "reference", "sdpa", "fused", "flex")
#: device types the flex backend resolves on (CPU: forward only, see megafire.attention.flex)
FLEX_DEVICES = ("cuda", "cpu")
log = logging.getLogger(__name__)
_logged: set[tuple[str, str, str, str]] = set()


def _fused_module():
    """The fused-kernel package, or None when it (or Triton) cannot be imported."""
    try:
        from megafire.attention import fused
        return fused
    except ImportError:
        return None


def _fused_supports(encoding: Optional[PositionalEncoding]) -> tuple[bool, str]:
    fused = _fused_module()
    if fused is None:
        return False, "megafire.attention.fused (Triton) cannot be imported"
    if encoding is not None and encoding.kind == "bias" and not fused.supports(encoding):
        return False, f"the fused kernels do not support encoding {encoding.name!r}"
    return True, ""


def check_backend(backend: str, encoding: Optional[PositionalEncoding]) -> None:
    """Device-independent checks, run at model construction."""
    if backend not in BACKENDS:
        raise ConfigError(f"attention.backend={backend!r} is not allowed; allowed: {', '.join(BACKENDS)}")
    kind = encoding.kind if encoding is not None else "none"
    if backend == "sdpa" and kind == "bias":
        raise ConfigError(f"attention.backend=sdpa cannot add the attention bias of encoding "
                          f"{encoding.name!r}; use reference, fused or auto")
    if backend == "flex":
        from .flex import flex_available, flex_unsupported_reason
        why = flex_available() or flex_unsupported_reason(encoding)
        if why is not None:
            raise ConfigError(f"attention.backend=flex is impossible: {why}. "
                              f"Use {'reference, fused or auto' if kind == 'bias' else 'sdpa, reference or auto'}")


def resolve_backend(backend: str, encoding: Optional[PositionalEncoding], device_type: str) -> str:
    """The concrete backend name for a request, an encoding and a device type ("cpu", "cuda")."""
    check_backend(backend, encoding)
    is_bias = encoding is not None and encoding.kind == "bias"
    if backend == "auto":
        if not is_bias:
            return "sdpa/fused" if device_type == "cuda" and _fused_module() is not None else "sdpa"
        if device_type == "cuda" and _fused_supports(encoding)[0]:
            return "fused"
        return "reference"
    if backend == "fused":
        if device_type != "cuda":
            raise ConfigError(f"attention.backend=fused needs a CUDA device (Triton kernels); "
                              f"tensors are on {device_type!r}. Use reference or auto")
        ok, why = _fused_supports(encoding)
        if not ok:
            raise ConfigError(f"attention.backend=fused is impossible: {why}. Use reference or auto")
    if backend == "flex" and device_type not in FLEX_DEVICES:
        raise ConfigError(f"attention.backend=flex runs on {' and '.join(FLEX_DEVICES)} here; tensors are on "
                          f"{device_type!r}. Use reference or auto")
    return backend


def fused_attention(q, k, v, encoding, q_pos, k_pos, **kwargs):
    from megafire.attention.fused import fused_bias_attention   # lazy: Triton only when used
    if encoding is not None and encoding.kind != "bias":         # rotated already / added at the input
        encoding = None
    return fused_bias_attention(q, k, v, encoding, q_pos, k_pos, **kwargs)


def sdpa_or_fused_attention(q, k, v, encoding, q_pos, k_pos, *, segment_ids_q=None, segment_ids_k=None,
                            inline: bool = True, **kwargs):
    """``auto`` for an encoding without a bias on CUDA (resolved only there; Triton's interpreter
    runs it on CPU in tests): the fused kernels when the call packs documents (segment ids, as
    many queries as keys, a head dim they compile for), else SDPA.

    Why per call: with segment ids SDPA needs a boolean mask, which takes it off its flash path
    (cuDNN / memory-efficient kernels, every masked tile computed), while the fused kernels skip
    the tiles whose documents cannot meet (with two documents per row a third of the causal
    tiles); without them SDPA-flash with ``is_causal`` is the faster kernel (fused f+b 0.93-0.96
    of it, docs/benchmarks.md). The branch reads only Python-level facts (None-ness, shapes), so
    a compiled block traces one side of it."""
    from megafire.attention.fused import HEAD_DIMS   # lazy, as in fused_attention
    if (segment_ids_q is not None and segment_ids_k is not None and q.shape[1] == k.shape[1]
            and q.shape[-1] in HEAD_DIMS):
        return fused_attention(q, k, v, encoding, q_pos, k_pos, segment_ids_q=segment_ids_q,
                               segment_ids_k=segment_ids_k, inline=inline, **kwargs)
    return sdpa_attention(q, k, v, encoding, q_pos, k_pos, segment_ids_q=segment_ids_q,
                          segment_ids_k=segment_ids_k, **kwargs)


def _flex_attention(q, k, v, encoding, q_pos, k_pos, **kwargs):
    from megafire.attention.flex import flex_attention_fn       # lazy: FlexAttention only when used
    return flex_attention_fn(q, k, v, encoding, q_pos, k_pos, **kwargs)


_FUNCTIONS: dict[str, Callable] = {"reference": reference_attention, "sdpa": sdpa_attention,
                                   "fused": fused_attention, "flex": _flex_attention,
                                   "sdpa/fused": sdpa_or_fused_attention}


def get_attention_fn(backend: str, encoding: Optional[PositionalEncoding], device_type: str) -> Callable:
    """Resolve and return the attention function; logs the choice once."""
    name = resolve_backend(backend, encoding, device_type)
    key = (backend, getattr(encoding, "name", "none"), device_type, name)
    if key not in _logged:
        _logged.add(key)
        log.info("attention.backend=%s with encoding %s on %s -> %s", backend, key[1], device_type, name)
    return _FUNCTIONS[name]
