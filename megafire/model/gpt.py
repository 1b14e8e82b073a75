"""Decoder-only GPT as three kinds of stage: embedding, blocks, final norm + head.

    h_0      = E[x] (+ p(positions) for absolute encodings)
    h_l      = Block_l(h_{l-1}, positions, segment_ids)           l = 1..num_layers
    logits   = W_out RMSNorm(h_L)                                 W_out = E when tied

Every stage takes and returns plain tensors (hidden states [B, T, hidden], positions
[T] | [B, T], segment ids [B, T] | None), so a pipeline can be cut between any two stages.
Sequence parallelism (``ParallelContext.sequence_parallel``, tp > 1): the embedding keeps this
rank's sequence shard of its output, the hidden states between stages are [B, T / tp, hidden],
and the head all-gathers them along T before the output projection (logits stay full length).
Logits are vocab-parallel: each TP rank returns its slice ``[B, T, V / tp]``
(:meth:`GPT.gather_logits` concatenates them); :func:`lm_loss` consumes them directly.
Positions and segment ids come from the caller (data loader, KV-cache decoder); no layer
builds them.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding, vocab_parallel_cross_entropy
from torch import nn
from torch.utils.checkpoint import checkpoint

from megafire.attention.kernel_options import set_run_overrides
from megafire.config import AttentionConfig, Config, ModelConfig
from megafire.parallel.comm import gather_last_dim, scatter_seq
from megafire.parallel.context import ParallelContext
from megafire.positional import PositionalEncoding

from .block import Block
from .cache import KVCache
from .layers import RMSNorm, build_encodings, column_parallel, init_methods
from .perf import fused_cross_entropy


class Embedding(nn.Module):
    """First stage: vocab-parallel token embedding, plus the absolute encoding if any."""

    def __init__(self, cfg: ModelConfig, parallel: ParallelContext, mp_config,
                 encoding: Optional[PositionalEncoding]):
        super().__init__()
        if cfg.vocab_size % parallel.tp_size:
            raise ValueError(f"model.vocab_size={cfg.vocab_size} must be divisible by parallel.tp={parallel.tp_size}")
        self.word = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, init_method=init_methods(cfg)[0],
                                           config=mp_config, tp_group=parallel.tp_group)
        self.encoding = encoding
        self.parallel = parallel

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> [B, T, hidden] (sequence parallel: this rank's [B, T / tp, hidden])."""
        x = self.word(input_ids)
        if self.encoding is not None:
            x = self.encoding.embed(x, positions)
        return scatter_seq(x, self.parallel.tp_group) if self.parallel.sp else x


class Head(nn.Module):
    """Last stage: final RMSNorm and the column-parallel output projection (tied or not)."""

    def __init__(self, cfg: ModelConfig, parallel: ParallelContext, mp_config):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, sequence_parallel=parallel.sp)
        self.tied = cfg.tie_embeddings
        self.parallel = parallel
        self.output = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, config=mp_config,
                                           init_method=init_methods(cfg)[0], bias=False, gather_output=False,
                                           skip_weight_param_allocation=self.tied, tp_group=parallel.tp_group)

    def forward(self, x: torch.Tensor, tied_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, T, hidden] (sequence parallel: [B, T / tp, hidden]) -> vocab-parallel logits
        [B, T, V / tp]; ``tied_weight`` = E when tied."""
        if self.tied and tied_weight is None:
            raise ValueError("tied embeddings: pass the embedding weight as tied_weight")
        return column_parallel(self.output, self.norm(x), self.parallel, tied_weight if self.tied else None)


class GPT(nn.Module):
    """Decoder-only GPT (pre-norm RMSNorm, SwiGLU, GQA, no linear biases by default).

    Construction is deterministic given ``seed`` (the global RNG is forked, not disturbed)
    and, through megatron's CPU initialization of full weights, independent of the TP size.
    """

    def __init__(self, model: ModelConfig, attention: AttentionConfig, parallel: ParallelContext, *,
                 seed: Optional[int] = None, params_dtype: torch.dtype = torch.float32, fused_qkv: bool = True,
                 activation_checkpointing: bool = False):
        super().__init__()
        self.config, self.attention_config, self.parallel = model, attention, parallel
        # this run's fused-kernel options for every later kernel call in the process (an empty mapping
        # restores the committed ones: each model built, e.g. each bench arm, gets its own)
        set_run_overrides(attention.fused_kernels)
        #: recompute each block in backward (training only; no dropout, so recomputation is exact)
        self.activation_checkpointing = activation_checkpointing
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            mp_config = parallel.megatron_config(params_dtype)
            embed_encoding, layer_encodings = build_encodings(model, parallel)
            self.embedding = Embedding(model, parallel, mp_config, embed_encoding)
            self.blocks = nn.ModuleList(
                Block(model, attention.backend, parallel, mp_config, layer_encodings[i], i, fused_qkv=fused_qkv)
                for i in range(model.num_layers))
            self.head = Head(model, parallel, mp_config)
        #: lm_loss through megafire.model.perf.fused_cross_entropy (set by perf.apply; tp = 1 only)
        self.fused_loss = False
        unique = {id(e): e for e in [embed_encoding, *layer_encodings] if e is not None}
        self.encodings: list[PositionalEncoding] = list(unique.values())   # plain list: not re-registered

    @classmethod
    def from_config(cls, cfg: Config, parallel: ParallelContext, **kwargs) -> "GPT":
        """Build from a full Config, seeded by ``train.seed``."""
        kwargs.setdefault("seed", cfg.train.seed)
        kwargs.setdefault("activation_checkpointing", cfg.parallel.activation_checkpointing)
        return cls(cfg.model, cfg.attention, parallel, **kwargs)

    def stages(self) -> list[nn.Module]:
        """[embedding, block_0, ..., block_{L-1}, head]: the pipeline-partitionable sequence."""
        return [self.embedding, *self.blocks, self.head]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                segment_ids: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None) -> torch.Tensor:
        """input_ids [B, T], positions [T] | [B, T], segment_ids [B, T] | None -> logits [B, T, V / tp]."""
        if not self.attention_config.document_mask:
            segment_ids = None
        if cache is not None:
            cache.extend(positions, segment_ids)
        x = self.embedding(input_ids, positions)                         # [B, T, hidden]
        for block in self.blocks:
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, positions, segment_ids, use_reentrant=False)
            else:
                x = block(x, positions, segment_ids, cache)
        return self.head(x, self.embedding.word.weight if self.head.tied else None)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks))

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel [B, T, V / tp] -> full [B, T, V] on every TP rank."""
        return gather_last_dim(logits, self.parallel.tp_group)   # megatron's gather is CUDA-only

    def loss(self, input_ids, positions, labels, segment_ids=None, loss_mask=None) -> torch.Tensor:
        """Mean next-token cross entropy (see :func:`lm_loss`)."""
        return lm_loss(self(input_ids, positions, segment_ids), labels, loss_mask, fused=self.fused_loss)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor] = None, *,
            reduction: str = "mean", fused: bool = False) -> torch.Tensor:
    """Cross entropy of vocab-parallel logits [B, T, V / tp] against labels [B, T].

    ``loss_t = logsumexp_v(logits_t) - logits_t[labels_t]`` via megatron's
    ``vocab_parallel_cross_entropy`` (its max and sum all-reduce over the TP group of
    parallel_state). Tokens with ``loss_mask == 0`` or a negative label do not count.
    ``reduction="mean"``: ``sum_t m_t loss_t / sum_t m_t``; ``"none"``: masked per-token [B, T].
    The input is not modified (megatron works in place on fp32 logits, so they are cloned;
    bf16 logits are converted to a fp32 copy by megatron anyway).
    ``fused=True`` (full-vocabulary logits, tp = 1): the same per-token loss from one compiled
    reduction over the logits in their own dtype (:func:`megafire.model.perf.fused_cross_entropy`).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    mask = (labels >= 0).float()
    if loss_mask is not None:
        mask = mask * loss_mask.float()
    if fused:
        per_token = fused_cross_entropy(logits, labels.clamp_min(0)) * mask          # [B, T]
    else:
        if logits.dtype == torch.float32:
            logits = logits.clone()
        per_token = vocab_parallel_cross_entropy(logits, labels.clamp_min(0)) * mask   # [B, T]
    if reduction == "none":
        return per_token
    return per_token.sum() / mask.sum().clamp_min(1.0)
