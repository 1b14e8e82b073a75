"""The reference arm of ``megafire bench train --peer compact``: a compact single-GPU GPT.

What a researcher writes in ~100 lines and trains with the usual single-GPU recipe: the same
shape as a megafire config (pre-norm RMSNorm, SwiGLU of the same width, RoPE base 10000 on
every head, tied embeddings, no biases, GQA if configured), ``torch.compile`` of the whole
model and loss, SDPA (flash, causal, no document mask), fused AdamW with the same betas
and weight decay, bf16 autocast over fp32 weights, the same micro-batch and gradient
accumulation, random tokens (its loss is not compared: only its speed).

It exists so that every speed claim about the trainer is measured against a peer of the
same shape in the same run; it is not part of the training code.
"""
from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, ffn: int, eps: float):
        super().__init__()
        self.h, self.kv, self.dh = heads, kv_heads, d // heads
        self.n1, self.n2 = nn.RMSNorm(d, eps=eps), nn.RMSNorm(d, eps=eps)
        self.qkv = nn.Linear(d, (heads + 2 * kv_heads) * self.dh, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.gate_up = nn.Linear(d, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).split([self.h * self.dh, self.kv * self.dh, self.kv * self.dh], -1)
        q, k, v = (t.view(B, T, -1, self.dh).transpose(1, 2) for t in (q, k, v))   # [B, H, T, D]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.h != self.kv)
        x = x + self.o(o.transpose(1, 2).reshape(B, T, -1))
        gate, up = self.gate_up(self.n2(x)).chunk(2, -1)
        return x + self.down(F.silu(gate) * up)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)                                   # rotate-half layout (Llama)
    return (x * cos + torch.cat((-x2, x1), -1) * sin).to(x.dtype)


class CompactGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, kv_heads: int, ffn: int, eps: float = 1e-5,
                 std: float = 0.02):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d, heads, kv_heads, ffn, eps) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=eps)
        self.dh = d // heads
        for name, p in self.named_parameters():
            if p.dim() == 2:
                scaled = name.endswith(("o.weight", "down.weight"))
                nn.init.normal_(p, std=std / math.sqrt(2 * layers) if scaled else std)

    def forward(self, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        inv = 1.0 / (10000 ** (torch.arange(0, self.dh, 2, device=idx.device).float() / self.dh))
        ang = torch.arange(T, device=idx.device).float()[:, None] * inv[None]
        ang = torch.cat((ang, ang), -1)
        cos, sin = ang.cos(), ang.sin()                       # [T, D]
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = F.linear(self.norm(x), self.emb.weight)     # tied head
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def bench_compact(cfg, steps: int, warmup: int, seq_lens=None) -> dict:
    """Train the compact peer of ``cfg``'s shape for ``steps`` optimizer steps of
    ``cfg.train.tokens_per_step`` tokens at each of ``seq_lens`` (default: every curriculum
    stage's length) on one GPU."""
    from megafire.flops import attention_flops_per_token, matmul_flops_per_token
    from megafire.train.components import peak_flops_per_device
    if not torch.cuda.is_available():
        from megafire.config import ConfigError
        raise ConfigError("megafire bench train --peer compact needs a CUDA GPU (the peer is torch.compile + bf16 "
                          "autocast on CUDA); use --peer rope or --peer none here")
    from .train import fresh_arm
    fresh_arm()
    m, t = cfg.model, cfg.train
    torch.manual_seed(t.seed)
    model = CompactGPT(m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads or m.num_heads,
                       m.resolved_ffn_hidden_size, m.norm_eps, m.init_std).cuda()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": other, "weight_decay": 0}],
                            lr=t.lr, betas=(t.beta1, t.beta2), fused=True)
    step_fn = torch.compile(model)
    peak = peak_flops_per_device("bf16")
    summary = {"encoding": "compact (torch.compile, SDPA, fused AdamW)", "by_seq_len": {}}
    for seq_len in sorted(seq_lens or {s.seq_len for s in cfg.stages()}):
        micro_tokens = t.micro_batch_tokens or t.tokens_per_step
        mb, accum = micro_tokens // seq_len, t.tokens_per_step // micro_tokens
        gen = torch.Generator(device="cuda").manual_seed(0)
        torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(accum):
                idx = torch.randint(0, m.vocab_size, (mb, seq_len + 1), device="cuda", generator=gen)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = step_fn(idx[:, :-1], idx[:, 1:]) / accum
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        kept = times[warmup:] or times
        dt = statistics.median(kept)
        flops = 3 * (matmul_flops_per_token(m) + attention_flops_per_token(m, seq_len))
        tps = t.tokens_per_step / dt
        summary["by_seq_len"][seq_len] = {"tokens_per_s": tps, "step_time_s": dt,
                                          "mfu": flops * tps / peak if peak else None, "num_steps": len(kept),
                                          "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    summary["tokens_per_s"] = statistics.median(s["tokens_per_s"] for s in summary["by_seq_len"].values())
    return summary
