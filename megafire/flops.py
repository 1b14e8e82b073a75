"""FLOP accounting per token, counting attention and the position encoding's own work.

For a decoder with hidden size ``d``, ``Hq`` query and ``Hkv`` key/value heads of size
``D``, SwiGLU width ``F``, vocabulary ``V``, ``L`` layers and sequence length ``T``, the
forward FLOPs per token (one multiply-add = 2 FLOPs) are::

    matmul    = 2 * [ L * (d*(Hq + 2*Hkv)*D + Hq*D*d + 3*d*F) + d*V ]
    attention = L * 4 * Hq * D * T_keys          QK^T and PV; T_keys = T / 2 causal, T otherwise
    encoding  = L * enc.flops(num_scores, T) / T  (bias / rotary; once, not per layer, for absolute)

with ``num_scores = T * T / 2`` (causal) or ``T * T`` per sequence and per layer: the fused
kernels evaluate the bias in every layer, even when the encoding is shared across layers.
Training (forward + backward) counts ``3 x`` forward. Embedding lookups, norms, activations
and softmax are not counted (conventional; they are O(d) per token).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from megafire.config import ModelConfig
from megafire.positional import PositionalEncoding


@dataclass(frozen=True)
class FlopsPerToken:
    """Forward FLOPs per token, split by source."""
    matmul: float
    attention: float
    encoding: float

    @property
    def forward(self) -> float:
        return self.matmul + self.attention + self.encoding

    @property
    def train(self) -> float:
        """Forward + backward: backward is counted as twice the forward."""
        return 3.0 * self.forward


def matmul_flops_per_token(cfg: ModelConfig) -> float:
    """2 x the parameters that multiply activations (embedding lookup excluded, head included)."""
    d, D = cfg.hidden_size, cfg.head_dim
    H, Hkv = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads
    per_layer = d * (H + 2 * Hkv) * D + H * D * d + 3 * d * cfg.resolved_ffn_hidden_size
    return 2.0 * (cfg.num_layers * per_layer + d * cfg.vocab_size)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
    """QK^T and PV matmuls over all layers: 4 * Hq * D * (T/2 if causal else T) * L."""
    keys = seq_len / 2 if causal else seq_len
    return cfg.num_layers * 4.0 * cfg.num_heads * cfg.head_dim * keys


def encoding_flops_per_token(encodings: Iterable[Optional[PositionalEncoding]], seq_len: int, *,
                             num_layers: int, causal: bool = True) -> float:
    """The encodings' own forward FLOPs per token (module doc for the per-layer convention).

    ``encodings``: the distinct encoding instances of a model built at tp_size=1 (or of one
    TP rank, then multiply by tp for bias/rotary encodings whose cost scales with heads).
    """
    total = 0.0
    num_scores = seq_len * seq_len / 2 if causal else seq_len * seq_len
    for enc in encodings:
        if enc is None or enc.kind == "none":
            continue
        if enc.kind == "absolute":
            total += enc.flops(0, seq_len) / seq_len
            continue
        times = num_layers if enc.shared_across_layers else 1   # a per-layer instance is listed per layer
        total += times * enc.flops(int(num_scores), seq_len) / seq_len
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int, encodings: Iterable[Optional[PositionalEncoding]] = (),
                    *, causal: bool = True) -> FlopsPerToken:
    """Forward FLOPs per token of a GPT with ``cfg`` at sequence length ``seq_len``.

    ``encodings``: the model's distinct encoding instances (``GPT.encodings``); a per-layer
    encoding appears once per layer there, a shared one once.
    """
    return FlopsPerToken(matmul=matmul_flops_per_token(cfg),
                         attention=attention_flops_per_token(cfg, seq_len, causal=causal),
                         encoding=encoding_flops_per_token(encodings, seq_len, num_layers=cfg.num_layers,
                                                           causal=causal))


def model_flops_per_token(model, seq_len: int, *, causal: bool = True) -> FlopsPerToken:
    """:func:`flops_per_token` for a built GPT, counted for the whole model (all TP ranks).

    A rank's attention-side encodings cover ``1/tp`` of the heads, so their FLOPs are scaled
    by ``tp``; an absolute encoding works on the full hidden state on every rank and is not.
    """
    tp = model.parallel.tp_size
    f = flops_per_token(model.config, seq_len, model.encodings, causal=causal)
    absolute = encoding_flops_per_token([e for e in model.encodings if e.kind == "absolute"], seq_len,
                                        num_layers=model.config.num_layers, causal=causal)
    return FlopsPerToken(f.matmul, f.attention, absolute + (f.encoding - absolute) * tp)


def mfu(tokens_per_s: float, train_flops_per_token: float, peak_flops_per_s: float, num_devices: int = 1) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the peak of all devices."""
    if peak_flops_per_s <= 0 or num_devices <= 0:
        raise ValueError("peak_flops_per_s and num_devices must be positive")
    return tokens_per_s * train_flops_per_token / (peak_flops_per_s * num_devices)
