"""Rotary position embedding (Su et al., 2021) and its context-extension scalings.

Layout is transformers' Llama "rotate-half": for the first ``r = rotary_dim`` channels of a
head, split ``x = [x1, x2]`` (halves of ``r/2``) and with angles ``theta_k(p) = p * w_k``,

    rotate(x, p) = x * cos(theta) + [-x2, x1] * sin(theta),   cos/sin over [theta, theta]

times an attention factor ``a`` (1 except YaRN) on both cos and sin; channels beyond ``r``
(``partial_rotary_factor < 1``, as GPT-NeoX) pass through. ``w_k = base^(-2k/r)``, ``k <
r/2``, base 10000. Scalings (factor ``s``), numerically equal to transformers'
``ROPE_INIT_FUNCTIONS`` (``rope_parameters`` with ``rope_type`` linear / dynamic / yarn;
"none" is its "default"; "ntk" has no transformers type of its own):

* ``none``:    ``w_k``.
* ``linear``:  position interpolation, ``w_k / s`` (== positions / s).
* ``ntk``:     NTK-aware, static: base ``base * s^(r/(r-2))``.
* ``dynamic``: dynamic NTK (inference): with ``n = max(positions) + 1`` and the original
  training length ``N``, base ``base * (s * max(n, N)/N - (s - 1))^(r/(r-2))`` -- the
  original frequencies up to ``N``. Stateless: transformers caches the largest ``n`` seen;
  both agree for a fresh module or non-decreasing lengths. Not shift-invariant across calls.
* ``yarn``:    per-frequency blend of ``w_k`` (extrapolation) and ``w_k / s``
  (interpolation) with a linear ramp between the dimensions that rotate ``beta_fast = 32``
  and ``beta_slow = 1`` times over ``N`` (range floored/ceiled, "truncate"), and attention
  factor ``a = 0.1 ln(s) + 1``.

Angles and the rotation are computed in fp32; outputs have the input dtype. RoPE has no
parameters and no per-head state, so TP needs nothing from it.

Implementation (``fused_rotary``, set from ``model.position.fused_rotary``; not maths, so not
an option of the encoding): ``"auto"`` rotates q and k in one Triton launch
(:mod:`megafire.positional.rotary_triton`, cos/sin computed in-kernel from ``inv_freq``) for
CUDA tensors and with the torch code below elsewhere; ``"false"`` always uses the torch code,
the reference; ``"true"`` requires the kernel (CUDA tensors, or Triton's interpreter under
``TRITON_INTERPRET=1``) and raises ConfigError otherwise.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from megafire.config import ConfigError

from .base import PositionalEncoding

SCALINGS = ("none", "linear", "ntk", "dynamic", "yarn")
FUSED_ROTARY = ("auto", "true", "false")
_FUSED_ROTARY_HELP = "allowed: auto (Triton on CUDA, torch elsewhere), true (Triton; CUDA tensors only), false (torch)"
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


def default_inv_freq(base: float, dim: int) -> torch.Tensor:
    """[dim/2] fp32 ``base^(-2k/dim)``, evaluated in the same order as transformers."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def yarn_inv_freq(base: float, dim: int, factor: float, original_max_positions: int) -> torch.Tensor:
    """YaRN frequencies: interpolate the slow dimensions, keep the fast ones (Peng et al., 2023)."""
    def dim_of(num_rotations: float) -> float:
        # the dimension whose wavelength fits num_rotations times into the original length
        return dim * math.log(original_max_positions / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_of(YARN_BETA_FAST)), 0)
    high = min(math.ceil(dim_of(YARN_BETA_SLOW)), dim - 1)
    if low == high:
        high += 0.001  # a one-dimension ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [dim/2]
    keep = 1 - ramp  # 1: extrapolate (fast dims), 0: interpolate (slow dims)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


class RoPE(PositionalEncoding):
    name = "rope"
    kind = "rotary"
    fp32_buffers = ("inv_freq",)
    #: "auto" | "true" | "false": the Triton kernel or the torch code (module docstring)
    fused_rotary: str = "auto"

    def __init__(self, num_heads: int, head_dim: int, *, tp_rank: int = 0, tp_size: int = 1,
                 base: float = 10000.0, scaling: str = "none", factor: float = 1.0,
                 original_max_positions: Optional[int] = None, partial_rotary_factor: float = 1.0):
        super().__init__(num_heads, head_dim, tp_rank=tp_rank, tp_size=tp_size)
        self._check_options(base, scaling, factor, original_max_positions, partial_rotary_factor)
        self.base, self.scaling, self.factor = float(base), scaling, float(factor)
        self.original_max_positions = original_max_positions
        self.partial_rotary_factor = float(partial_rotary_factor)
        self.rotary_dim = int(head_dim * partial_rotary_factor)
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"rotary dim int(head_dim * partial_rotary_factor) = {self.rotary_dim} must be even and >= 2")
        dim = self.rotary_dim
        self.attention_scaling = 1.0
        if scaling in ("none", "dynamic"):  # dynamic starts from the original frequencies
            inv_freq = default_inv_freq(self.base, dim)
        elif scaling == "linear":
            inv_freq = default_inv_freq(self.base, dim) / self.factor
        elif scaling == "ntk":
            inv_freq = default_inv_freq(self.base * self.factor ** (dim / (dim - 2)), dim)
        else:  # yarn
            inv_freq = yarn_inv_freq(self.base, dim, self.factor, original_max_positions)
            self.attention_scaling = 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [rotary_dim/2] fp32

    @staticmethod
    def _check_options(base, scaling, factor, original_max_positions, partial_rotary_factor) -> None:
        if scaling not in SCALINGS:
            raise ValueError(f"rope scaling must be one of {'|'.join(SCALINGS)}, got {scaling!r}")
        if base <= 0:
            raise ValueError(f"rope base must be positive, got {base}")
        if scaling == "none" and factor != 1.0:
            raise ValueError(f"rope factor={factor} needs a scaling; choose one of {'|'.join(SCALINGS[1:])}")
        if factor < 1.0:
            raise ValueError(f"rope factor must be >= 1, got {factor}")
        if scaling in ("dynamic", "yarn") and not (original_max_positions and original_max_positions > 0):
            raise ValueError(f"rope scaling {scaling!r} needs original_max_positions (the training length), "
                             f"got {original_max_positions!r}")
        if not 0.0 < partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {partial_rotary_factor}")

    def frequencies(self, *positions: torch.Tensor) -> torch.Tensor:
        """The inverse frequencies [rotary_dim/2] used for these positions (dynamic: depends on them)."""
        if self.scaling != "dynamic":
            return self.inv_freq.float()
        dim, orig = self.rotary_dim, self.original_max_positions
        seq_len = torch.stack([p.max() for p in positions]).max().float() + 1  # stays on device: no sync
        seq_len = seq_len.clamp_min(orig)
        base = self.base * (self.factor * seq_len / orig - (self.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** (torch.arange(0, dim, 2, device=base.device).float() / dim))

    def cos_sin(self, positions: torch.Tensor, inv_freq: torch.Tensor):
        """positions [T] | [B, T] -> fp32 cos, sin [T, r] | [B, T, r], attention factor included."""
        freqs = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)  # [..., T, r/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [..., T, r]
        return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling

    def _apply_rotation(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [B, T, H, D]; cos/sin: [T, r] | [B, T, r] -> insert the head axis
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [(B,) T, 1, r]
        r = self.rotary_dim
        xr = x[..., :r].float()
        x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
        rotated = xr * cos + torch.cat((-x2, x1), dim=-1) * sin
        if r == x.shape[-1]:
            return rotated.to(x.dtype)
        return torch.cat((rotated.to(x.dtype), x[..., r:]), dim=-1)

    def set_fused_rotary(self, mode: str) -> "RoPE":
        if mode not in FUSED_ROTARY:
            raise ConfigError(f"model.position.fused_rotary={mode!r} is not allowed; {_FUSED_ROTARY_HELP}")
        self.fused_rotary = mode
        return self

    def _use_fused(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        if self.fused_rotary == "false":
            return False
        from . import rotary_triton  # light; Triton itself is imported on the kernel's first use
        dtypes_ok = q.dtype in rotary_triton.SUPPORTED_DTYPES and k.dtype in rotary_triton.SUPPORTED_DTYPES
        if self.fused_rotary == "auto":
            if torch.compiler.is_compiling():   # inside a compiled block the rotation fuses with its neighbours
                return False
            if not (q.is_cuda and dtypes_ok):
                return False
            error = rotary_triton.triton_import_error()
            if error is not None:
                warnings.warn(f"model.position.fused_rotary=auto: Triton failed to import ({error}); "
                              f"rotating q and k with the torch code", stacklevel=2)
            return error is None
        if not (q.is_cuda or rotary_triton.interpreting()):
            raise ConfigError(f"model.position.fused_rotary='true' runs a Triton kernel on CUDA tensors, got "
                              f"{q.device.type} tensors; {_FUSED_ROTARY_HELP}")
        if not dtypes_ok:
            raise ConfigError(f"model.position.fused_rotary='true' supports fp32, fp16 and bf16, got {q.dtype}, "
                              f"{k.dtype}; {_FUSED_ROTARY_HELP}")
        error = rotary_triton.triton_import_error()
        if error is not None:
            raise ConfigError(f"model.position.fused_rotary='true' needs Triton, which failed to import ({error}); "
                              f"{_FUSED_ROTARY_HELP}")
        return True

    def rotate(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
        # q: [B, Tq, Hq, D], k: [B, Tk, Hk, D]; q_pos: [Tq] | [B, Tq]; k_pos: [Tk] | [B, Tk]
        inv_freq = self.frequencies(q_pos, k_pos)
        if self._use_fused(q, k):
            from .rotary_triton import fused_rotary
            return fused_rotary(q, k, q_pos, k_pos, inv_freq, self.attention_scaling, self.rotary_dim)
        q_out = self._apply_rotation(q, *self.cos_sin(q_pos, inv_freq))
        k_out = self._apply_rotation(k, *self.cos_sin(k_pos, inv_freq))
        return q_out, k_out

    def flops(self, num_scores: int, num_tokens: int) -> int:
        # per rotated element of q and k: 2 mul + 1 add; cos and sin per token and frequency
        return num_tokens * (6 * self.num_heads_local * self.rotary_dim + 2 * self.rotary_dim)

    def extra_repr(self) -> str:
        extra = f", factor={self.factor:g}" if self.scaling != "none" else ""
        if self.original_max_positions:
            extra += f", original_max_positions={self.original_max_positions}"
        return (f"{super().extra_repr()}, base={self.base:g}, scaling={self.scaling}{extra}, "
                f"rotary_dim={self.rotary_dim}")
