"""Which tp x pp x dp layouts (with ZeRO stage, precision and options) the trainer runs, and why not.

``check_layout`` is called by the trainer before any process group is used, so an
unsupported combination fails at start-up with a config error naming the keys, not
with a hang or a silently wrong update deep inside DeepSpeed.
"""
from __future__ import annotations

from megafire.config import Config, ConfigError


def check_layout(cfg: Config, world_size: int) -> int:
    """Raise ConfigError for a layout the trainer cannot run correctly; return dp = world / (tp * pp)."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    if world_size % (p.tp * p.pp):
        raise ConfigError(f"parallel.tp * parallel.pp = {p.tp} * {p.pp} must divide the world size {world_size} "
                          f"(data parallel = world / (tp * pp))")
    dp = world_size // (p.tp * p.pp)
    if p.sequence_parallel:
        _check_sequence_parallel(cfg)
    if p.pp > 1:
        if p.zero_stage != 1:
            raise ConfigError(f"parallel.pp={p.pp} needs parallel.zero_stage=1, got {p.zero_stage}: DeepSpeed "
                              "pipelines refuse ZeRO-2/3, and with ZeRO-0 in fp32 DeepSpeed clips every stage with "
                              "stage 0's gradient norm only (silently wrong updates)")
        if m.num_layers < p.pp:
            raise ConfigError(f"parallel.pp={p.pp} exceeds model.num_layers={m.num_layers}: every stage needs a block")
    if p.tp > 1:
        kv = m.num_kv_heads or m.num_heads
        if m.num_heads % p.tp or kv % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} must divide model.num_heads={m.num_heads} and "
                              f"model.num_kv_heads={kv} (each TP rank owns whole heads)")
        if m.vocab_size % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} must divide model.vocab_size={m.vocab_size} "
                              f"(vocab-parallel embedding and output)")
        if m.resolved_ffn_hidden_size % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} must divide the SwiGLU width {m.resolved_ffn_hidden_size} "
                              f"(model.ffn_hidden_size)")
    if t.tokens_per_step % dp:
        raise ConfigError(f"train.tokens_per_step={t.tokens_per_step} must be divisible by the data-parallel "
                          f"size {dp} = world {world_size} / (tp {p.tp} * pp {p.pp})")
    return dp


def _check_sequence_parallel(cfg: Config) -> None:
    """Sequence parallelism shards [B, T, hidden] along T over the TP group (see docs/parallel.md)."""
    p = cfg.parallel
    if p.tp < 2:
        raise ConfigError(f"parallel.sequence_parallel=true needs parallel.tp > 1 (got tp={p.tp}): it shards "
                          "activations over the tensor-parallel group")
    if p.pp > 1:
        raise ConfigError(f"parallel.sequence_parallel=true is not supported with parallel.pp={p.pp} (the pipeline "
                          "stages pass full-length hidden states); use pp=1")
    lengths = {"data.seq_len": cfg.data.seq_len}
    for i, stage in enumerate(cfg.curriculum.stages):
        lengths[f"curriculum.stages[{i}].seq_len"] = stage.seq_len
    for key, length in lengths.items():
        if length % p.tp:
            raise ConfigError(f"parallel.sequence_parallel=true needs {key}={length} divisible by "
                              f"parallel.tp={p.tp} (each TP rank holds T / tp positions)")
