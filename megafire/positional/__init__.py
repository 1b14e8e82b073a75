"""Position encodings: one module per encoding, one registry.

``build_encoding(name, num_heads=..., head_dim=..., **options)`` builds any of them;
unknown names or options raise ``ValueError`` naming the allowed choices.
"""
from __future__ import annotations

from .base import PositionalEncoding, mark_tp_replicated, relative_positions
from .registry import ENCODINGS, build_encoding, encoding_class, register

__all__ = ["PositionalEncoding", "ENCODINGS", "build_encoding", "encoding_class", "register",
           "mark_tp_replicated", "relative_positions"]
