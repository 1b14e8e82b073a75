"""A megafire decoder as a Hugging Face causal LM (remote code; torch + transformers only).

Shipped by ``megafire export`` for encodings LlamaForCausalLM cannot express; load with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``. The maths is
megafire's, restated here without importing megafire:

    h_0     = E[x] (+ p(positions) for absolute encodings)
    h'_l    = h_{l-1} + W_o Attn(RMSNorm(h_{l-1}))
    h_l     = h'_l + W_down(silu(W_gate u) * W_up u),   u = RMSNorm(h'_l)
    logits  = W_out RMSNorm(h_L)                          (W_out = E when tied)
    Attn:   s[h, i, j] = q_h(i) . k_g(h)(j) / sqrt(D) + b_h(i, j),  g(h) = h // (Hq / Hkv),
            softmax over allowed j (causal, not padding), fp32 when there is a bias.

RMSNorm: ``x / sqrt(mean(x^2) + eps) * w`` in fp32. Position encodings (i = query position,
j = key position, d = max(i - j, 0)):

* rope: rotate-half on the first ``r = head_dim * partial_rotary_factor`` channels,
  ``theta_k(p) = p * w_k``, ``w_k = base^(-2k/r)``, scaled per ``scaling`` (linear ``w/s``;
  ntk base ``base * s^(r/(r-2))``; dynamic NTK from the longest position; yarn ramp between
  beta_fast 32 and beta_slow 1, attention factor ``0.1 ln s + 1``);
* alibi ``-m_h d``; kerple_log ``-r1_h log(1 + r2_h d)``; kerple_power ``-r1_h d^r2_h``;
* t5: a learned scalar per (log-spaced causal bucket of d, head);
* fire: ``f(psi(d) / (psi(max(L, i)) + eps))``, ``psi(x) = log(1 + |c| x)``, f an MLP;
* sinusoidal / learned absolute embeddings added to E[x].

Positions: ``position_ids`` (default: the cache length onwards). Keys are taken to sit at
consecutive positions ending at the last query's position, which is what ``generate``
produces (left padding included: the first real token is position 0), so bias encodings
need no extra state in the cache. Packed documents with position resets are not supported.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_megafire import MegafireConfig

QUERY_CHUNK = 1024          # query rows per materialized score block (bounds memory at long lengths)
KERPLE_R_MIN = 1e-4
_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
_SDPA_GQA = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


# --- position encodings -------------------------------------------------------------------
class RotaryEmbedding(nn.Module):
    """RoPE with megafire's scalings; no buffers (frequencies are recomputed, cheaply, per call)."""

    def __init__(self, head_dim: int, base=10000.0, scaling="none", factor=1.0, original_max_positions=None,
                 partial_rotary_factor=1.0, **_):
        super().__init__()
        self.base, self.scaling, self.factor = float(base), scaling, float(factor)
        self.original = original_max_positions
        self.dim = int(head_dim * partial_rotary_factor)
        self.attention_scaling = 0.1 * math.log(self.factor) + 1.0 if scaling == "yarn" and self.factor > 1 else 1.0

    def _default(self, base, device) -> torch.Tensor:
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim))

    def _yarn(self, device) -> torch.Tensor:
        dim, base, s = self.dim, self.base, self.factor

        def dim_of(rotations):  # the dimension rotating `rotations` times over the original length
            return dim * math.log(self.original / (rotations * 2 * math.pi)) / (2 * math.log(base))
        low, high = max(math.floor(dim_of(32.0)), 0), min(math.ceil(dim_of(1.0)), dim - 1)
        high = high + 0.001 if low == high else high
        keep = 1 - ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
        return (1.0 / (s * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep

    def inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        """[r/2] fp32; dynamic NTK uses the longest position n: base * (s max(n, N)/N - (s - 1))^(r/(r-2))."""
        device, r = positions.device, self.dim
        if self.scaling == "linear":
            return self._default(self.base, device) / self.factor
        if self.scaling == "ntk":
            return self._default(self.base * self.factor ** (r / (r - 2)), device)
        if self.scaling == "yarn":
            return self._yarn(device)
        if self.scaling == "dynamic":
            n = (positions.max().float() + 1).clamp_min(self.original)
            base = self.base * (self.factor * n / self.original - (self.factor - 1)) ** (r / (r - 2))
            return 1.0 / (base ** (torch.arange(0, r, 2, device=device).float() / r))
        return self._default(self.base, device)

    def cos_sin(self, positions: torch.Tensor):
        """positions [B, T] -> fp32 cos, sin [B, 1, T, r] (attention factor included)."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq(positions)       # [B, T, r/2]
        angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)                   # [B, 1, T, r]
        return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, D]: rotate-half on the first r channels in fp32; the rest passes through."""
        r = self.dim
        xr = x[..., :r].float()
        rotated = xr * cos + torch.cat((-xr[..., r // 2:], xr[..., : r // 2]), dim=-1) * sin
        return torch.cat((rotated.to(x.dtype), x[..., r:]), dim=-1) if r < x.shape[-1] else rotated.to(x.dtype)


def alibi_slopes(num_heads: int) -> list[float]:
    """2^(-8h/H) for H a power of two; else the lower power's set plus every other slope of the doubled set."""
    def geometric(n):
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]
    lower = 2 ** int(math.floor(math.log2(num_heads)))
    if lower == num_heads:
        return geometric(num_heads)
    return geometric(lower) + geometric(2 * lower)[0::2][: num_heads - lower]


def distances(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """d = max(i - j, 0): [B, Tq, Tk] int64 (masked j > i get 0, so every bias stays finite)."""
    return (q_pos.long().unsqueeze(-1) - k_pos.long().unsqueeze(-2)).clamp_min(0)


class ALiBiBias(nn.Module):
    def __init__(self, num_heads: int, **_):
        super().__init__()
        self.num_heads = num_heads

    def forward(self, q_pos, k_pos):
        slopes = torch.tensor(alibi_slopes(self.num_heads), dtype=torch.float32, device=q_pos.device)
        return -slopes.view(-1, 1, 1) * distances(q_pos, k_pos).float().unsqueeze(-3)   # [B, H, Tq, Tk]


class KerpleBias(nn.Module):
    """log: -r1 log(1 + r2 d); power: -r1 d^r2. r1 = R + softplus(r1_raw); r2 likewise (log) or
    2 - (2 - R) sigmoid(-r2_raw) (power), R = 1e-4."""

    def __init__(self, num_heads: int, power: bool, **_):
        super().__init__()
        self.power = power
        self.r1_raw = nn.Parameter(torch.zeros(num_heads))
        self.r2_raw = nn.Parameter(torch.zeros(num_heads))

    def forward(self, q_pos, k_pos):
        dtype = torch.promote_types(self.r1_raw.dtype, torch.float32)
        d = distances(q_pos, k_pos).to(dtype).unsqueeze(-3)                        # [B, 1, Tq, Tk]
        r1 = (KERPLE_R_MIN + F.softplus(self.r1_raw)).to(dtype).view(-1, 1, 1)
        if not self.power:
            r2 = (KERPLE_R_MIN + F.softplus(self.r2_raw)).to(dtype).view(-1, 1, 1)
            return -r1 * torch.log1p(r2 * d)
        r2 = (2.0 - (2.0 - KERPLE_R_MIN) * torch.sigmoid(-self.r2_raw)).to(dtype).view(-1, 1, 1)
        # exp(r2 log d) on d >= 1 and 0 at d = 0 (as megafire, which avoids pow's 0 * log 0 gradient)
        return torch.where(d > 0, -r1 * torch.exp(r2 * torch.log(d.clamp_min(1.0))), torch.zeros((), dtype=dtype))


class T5Bias(nn.Module):
    """b_h = W[bucket(d), h]; bucket(d) = d below E = buckets/2, else E + floor(log(d/E)/log(M/E) (buckets-E))."""

    def __init__(self, num_heads: int, num_buckets=32, max_distance=128, **_):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)

    def bucket(self, d: torch.Tensor) -> torch.Tensor:
        exact = self.num_buckets // 2
        scaled = (torch.log(d.clamp_min(exact).float() / exact) / math.log(self.max_distance / exact)
                  * (self.num_buckets - exact))
        return torch.where(d < exact, d, (exact + scaled.long()).clamp_max(self.num_buckets - 1))

    def forward(self, q_pos, k_pos):
        table = self.relative_attention_bias.weight
        table = table.to(torch.promote_types(table.dtype, torch.float32))
        return F.embedding(self.bucket(distances(q_pos, k_pos)), table).movedim(-1, -3)


class FIREBias(nn.Module):
    """b_h(i, j) = f_h(psi(d) / (psi(max(L, i)) + eps)), psi(x) = log(1 + c x), c = |c_raw|,
    L = |L_mult| init_L (0 without threshold); ablations: psi = id (no log), f(psi(d)) (not progressive)."""

    def __init__(self, num_heads: int, width=32, depth=1, init_c=0.1, init_L=512.0, use_log=True,
                 use_threshold=True, progressive=True, eps=1e-6, **_):
        super().__init__()
        layers = []
        for fan_in in [1] + [width] * (depth - 1):
            layers += [nn.Linear(fan_in, width), nn.ReLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(width, num_heads))
        self.c_raw = nn.Parameter(torch.tensor(float(init_c)))
        self.L_mult = nn.Parameter(torch.tensor(1.0))
        self.init_L, self.eps = float(init_L), float(eps)
        self.use_log, self.use_threshold, self.progressive = use_log, use_threshold, progressive

    def psi(self, x):
        return torch.log1p(self.c_raw.abs().to(x.dtype) * x) if self.use_log else x

    def forward(self, q_pos, k_pos):
        dtype = torch.promote_types(self.c_raw.dtype, torch.float32)
        x = self.psi(distances(q_pos, k_pos).to(dtype))                            # [B, Tq, Tk]
        if self.progressive:
            L = self.L_mult.abs() * self.init_L if self.use_threshold else torch.zeros_like(self.L_mult)
            i = q_pos.to(dtype).unsqueeze(-1)                                       # [B, Tq, 1]
            x = x / (self.psi(torch.maximum(i, L.to(dtype))) + self.eps)
        h = x.unsqueeze(-1)
        for layer in self.mlp:
            h = F.linear(h, layer.weight.to(h.dtype), layer.bias.to(h.dtype)) if isinstance(layer, nn.Linear) else layer(h)
        return h.movedim(-1, -3)                                                    # [B, H, Tq, Tk]


def build_bias(config: MegafireConfig) -> nn.Module:
    name, options, H = config.position_encoding, config.position_options, config.num_attention_heads
    if name == "alibi":
        return ALiBiBias(H)
    if name in ("kerple_log", "kerple_power"):
        return KerpleBias(H, power=name == "kerple_power")
    if name == "t5":
        return T5Bias(H, **options)
    return FIREBias(H, **options)


class SinusoidalPositions(nn.Module):
    """PE(p, 2k) = sin(p base^(-2k/d)), PE(p, 2k+1) = cos(...), added to the token embeddings."""

    def __init__(self, hidden_size: int, base=10000.0, **_):
        super().__init__()
        self.hidden_size, self.base = hidden_size, float(base)

    def forward(self, x, positions):
        exponents = torch.arange(0, self.hidden_size, 2, dtype=torch.float64, device=x.device) / self.hidden_size
        angles = positions.float().unsqueeze(-1) * (self.base ** -exponents).float()
        return x + torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2).to(x.dtype)


class LearnedPositions(nn.Module):
    def __init__(self, hidden_size: int, max_positions: int, **_):
        super().__init__()
        self.embedding = nn.Embedding(max_positions, hidden_size)

    def forward(self, x, positions):
        if int(positions.max()) >= self.embedding.num_embeddings:
            raise ValueError(f"learned absolute positions must be < {self.embedding.num_embeddings}, "
                             f"got {int(positions.max())}")
        return x + self.embedding(positions).to(x.dtype)


# --- blocks ---------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class MegafireMLP(nn.Module):
    def __init__(self, config: MegafireConfig):
        super().__init__()
        h, f, b = config.hidden_size, config.intermediate_size, config.linear_bias
        self.gate_proj, self.up_proj = nn.Linear(h, f, bias=b), nn.Linear(h, f, bias=b)
        self.down_proj = nn.Linear(f, h, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def allowed_keys(tq: int, tk: int, attention_mask: Optional[torch.Tensor], device) -> torch.Tensor:
    """Boolean [B|1, 1, Tq, Tk]: causal (queries are the last Tq keys) and not padding.

    The diagonal is always allowed, so padding queries (whose output nobody reads) never
    get an empty softmax row.
    """
    i = torch.arange(tq, device=device).unsqueeze(-1) + (tk - tq)
    j = torch.arange(tk, device=device).unsqueeze(0)
    allowed = (j <= i).view(1, 1, tq, tk)
    if attention_mask is not None:
        if attention_mask.dim() == 4:                       # a ready-made mask: bool, or additive float
            keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
            allowed = allowed & keep[..., -tq:, -tk:]
        else:
            allowed = allowed & attention_mask[:, -tk:].bool().view(-1, 1, 1, tk)
    return allowed | (j == i).view(1, 1, tq, tk)


def bias_attention(q, k, v, encoding, q_pos, k_pos, allowed, scale):
    """softmax(q k^T scale + b(q_pos, k_pos), allowed) v in fp32, QUERY_CHUNK query rows at a time.

    q [B, H, Tq, D], k/v [B, H, Tk, D] (groups already expanded) -> [B, H, Tq, D] in q's dtype.
    """
    kf, vf, out = k.float().transpose(-1, -2), v.float(), []
    for start in range(0, q.shape[2], QUERY_CHUNK):
        stop = min(q.shape[2], start + QUERY_CHUNK)
        s = q[:, :, start:stop].float() @ kf * scale + encoding(q_pos[:, start:stop], k_pos).float()
        s = s.masked_fill(~allowed[..., start:stop, :], float("-inf"))
        out.append(torch.softmax(s, dim=-1) @ vf)
    return torch.cat(out, dim=2).to(q.dtype)


class MegafireAttention(nn.Module):
    def __init__(self, config: MegafireConfig, layer_idx: int, own_bias: Optional[nn.Module]):
        super().__init__()
        self.layer_idx = layer_idx
        self.H, self.Hkv, self.D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h, b = config.hidden_size, config.linear_bias
        self.q_proj = nn.Linear(h, self.H * self.D, bias=b)
        self.k_proj = nn.Linear(h, self.Hkv * self.D, bias=b)
        self.v_proj = nn.Linear(h, self.Hkv * self.D, bias=b)
        self.o_proj = nn.Linear(self.H * self.D, h, bias=b)
        self.position = own_bias          # per-layer bias encoding (None: shared one, or no bias)

    def forward(self, x, q_pos, rope, cos_sin, bias, cache, attention_mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.D).transpose(1, 2)             # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.Hkv, self.D).transpose(1, 2)           # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.Hkv, self.D).transpose(1, 2)
        if rope is not None:
            q, k = rope.rotate(q, *cos_sin), rope.rotate(k, *cos_sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)                               # [B, Hkv, Tk, D]
        Tk = k.shape[2]
        allowed = allowed_keys(T, Tk, attention_mask, x.device)
        scale = 1.0 / math.sqrt(self.D)
        bias = self.position if self.position is not None else bias
        if bias is not None:
            k_pos = q_pos[:, -1:] - torch.arange(Tk - 1, -1, -1, device=x.device)   # consecutive keys
            R = self.H // self.Hkv
            o = bias_attention(q, k.repeat_interleave(R, 1), v.repeat_interleave(R, 1), bias, q_pos,
                               k_pos.clamp_min(0), allowed, scale)
        elif _SDPA_GQA:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                               enable_gqa=self.H != self.Hkv)
        else:
            R = self.H // self.Hkv
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(R, 1), v.repeat_interleave(R, 1),
                                               attn_mask=allowed, scale=scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.H * self.D))


class MegafireDecoderLayer(nn.Module):
    def __init__(self, config: MegafireConfig, layer_idx: int, own_bias: Optional[nn.Module]):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MegafireAttention(config, layer_idx, own_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MegafireMLP(config)

    def forward(self, x, q_pos, rope, cos_sin, bias, cache, attention_mask):
        x = x + self.self_attn(self.input_layernorm(x), q_pos, rope, cos_sin, bias, cache, attention_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


# --- models -----------------------------------------------------------------------------------
class MegafirePreTrainedModel(PreTrainedModel):
    config_class = MegafireConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MegafireDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_cache_class = True          # transformers 4.x: takes Cache objects


class MegafireModel(MegafirePreTrainedModel):
    def __init__(self, config: MegafireConfig):
        super().__init__(config)
        kind, options = config.position_kind, config.position_options
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_encoding == "learned":
            self.embed_positions = LearnedPositions(**{"hidden_size": config.hidden_size, **options})
        elif config.position_encoding == "sinusoidal":
            self.embed_positions = SinusoidalPositions(**{"hidden_size": config.hidden_size, **options})
        shared = kind == "bias" and bool(options.get("shared", False))
        self.position = build_bias(config) if shared else None
        self.rope = RotaryEmbedding(config.head_dim, **options) if kind == "rotary" else None
        self.layers = nn.ModuleList(
            MegafireDecoderLayer(config, i, build_bias(config) if kind == "bias" and not shared else None)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _positions(self, position_ids, cache_position, past_length: int, batch: int, length: int, device):
        if position_ids is None:
            position_ids = (cache_position if cache_position is not None
                            else torch.arange(past_length, past_length + length, device=device))
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        return position_ids.expand(batch, -1).clamp_min(0)                          # [B, T]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        # transformers 4.x passes cache_position (the new tokens' indices); 5.x does not
        cache_position = kwargs.get("cache_position")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds      # [B, T, hidden]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        q_pos = self._positions(position_ids, cache_position, past, x.shape[0], x.shape[1], x.device)
        if hasattr(self, "embed_positions"):
            x = self.embed_positions(x, q_pos)
        cos_sin = self.rope.cos_sin(q_pos) if self.rope is not None else None
        for layer in self.layers:
            x = layer(x, q_pos, self.rope, cos_sin, self.position, past_key_values, attention_mask)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x),
                                       past_key_values=past_key_values if use_cache else None)


class MegafireForCausalLM(MegafirePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config: MegafireConfig):
        super().__init__(config)
        self.model = MegafireModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         cache_position=kwargs.get("cache_position"))
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:   # mean next-token cross entropy; label -100 is ignored
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
