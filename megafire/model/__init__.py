"""Decoder-only GPT on megatron-core tensor-parallel layers; KV-cache decoding."""
from __future__ import annotations

from .attention import Attention
from .block import Block
from .cache import KVCache
from .generate import generate
from .gpt import GPT, Embedding, Head, lm_loss
from .layers import RMSNorm, SwiGLU, build_encodings

__all__ = ["GPT", "Embedding", "Block", "Head", "Attention", "RMSNorm", "SwiGLU", "KVCache",
           "lm_loss", "generate", "build_encodings"]
