"""RoPE against transformers' rope init functions and Llama rotation; shift invariance."""
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from megafire.positional import build_encoding

H, D = 4, 64
ORIG = 256  # the "training length" of the scaled variants


def hf_config(rope_type, factor=None, theta=10000.0, max_positions=ORIG, original=None, partial=None):
    params = {"rope_type": rope_type, "rope_theta": theta}
    if factor is not None:
        params["factor"] = factor
    if original is not None:
        params["original_max_position_embeddings"] = original
    if partial is not None:
        params["partial_rotary_factor"] = partial
    return LlamaConfig(hidden_size=H * D, num_attention_heads=H, head_dim=D,
                       max_position_embeddings=max_positions, rope_parameters=params)


# (our options, transformers config) for the types transformers has
HF_CASES = {
    "none": ({}, lambda: hf_config("default")),
    "linear": ({"scaling": "linear", "factor": 4.0}, lambda: hf_config("linear", 4.0)),
    "dynamic": ({"scaling": "dynamic", "factor": 4.0, "original_max_positions": ORIG},
                lambda: hf_config("dynamic", 4.0)),
    "yarn": ({"scaling": "yarn", "factor": 8.0, "original_max_positions": ORIG},
             lambda: hf_config("yarn", 8.0, max_positions=8 * ORIG, original=ORIG)),
    # a tiny base stretches the ramp past the last dimension: exercises its clipping
    "yarn_clipped": ({"scaling": "yarn", "factor": 4.0, "original_max_positions": ORIG, "base": 4.0},
                     lambda: hf_config("yarn", 4.0, theta=4.0, max_positions=4 * ORIG, original=ORIG)),
}


def hf_init(config):
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_init_equals_transformers(case):
    options, config = HF_CASES[case]
    enc = build_encoding("rope", num_heads=H, head_dim=D, **options)
    inv_freq, scaling = hf_init(config())
    torch.testing.assert_close(enc.inv_freq, inv_freq, rtol=1e-6, atol=0)
    assert enc.attention_scaling == pytest.approx(scaling, rel=1e-12)
    if case == "yarn":
        assert scaling == pytest.approx(0.1 * math.log(8.0) + 1)
        ramp = enc.inv_freq / hf_init(hf_config("default"))[0]
        assert ramp[0] == pytest.approx(1.0) and ramp[-1] == pytest.approx(1 / 8.0)  # really blends


def test_ntk_equals_transformers():
    s = 4.0
    enc = build_encoding("rope", num_heads=H, head_dim=D, scaling="ntk", factor=s)
    # static NTK-aware is the default RoPE with base * s^(d/(d-2)) ...
    ref, _ = hf_init(hf_config("default", theta=10000.0 * s ** (D / (D - 2))))
    torch.testing.assert_close(enc.inv_freq, ref, rtol=1e-6, atol=0)
    # ... and the dynamic rule at the length where its scale reaches s: s*n/N - (s-1) = s
    dyn, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config("dynamic", s), seq_len=ORIG * (2 * s - 1) / s)
    torch.testing.assert_close(enc.inv_freq, dyn, rtol=1e-5, atol=0)


def test_partial_rotary_equals_transformers_init():
    enc = build_encoding("rope", num_heads=H, head_dim=D, scaling="linear", factor=2.0, partial_rotary_factor=0.5)
    ref, _ = ROPE_INIT_FUNCTIONS["linear"](hf_config("linear", 2.0, partial=0.5))
    assert enc.rotary_dim == D // 2
    torch.testing.assert_close(enc.inv_freq, ref, rtol=1e-6, atol=0)
    q = torch.randn(2, 5, H, D)
    q_rot, _ = enc.rotate(q, q, torch.arange(5), torch.arange(5))
    assert torch.equal(q_rot[..., D // 2:], q[..., D // 2:])  # the rest passes through
    half = build_encoding("rope", num_heads=H, head_dim=D // 2, scaling="linear", factor=2.0)
    torch.testing.assert_close(q_rot[..., :D // 2], half.rotate(q[..., :D // 2], q[..., :D // 2],
                                                                 torch.arange(5), torch.arange(5))[0])


@pytest.mark.parametrize("case", list(HF_CASES))
def test_rotation_equals_llama(case):
    options, config = HF_CASES[case]
    enc = build_encoding("rope", num_heads=H, head_dim=D, **options)
    gen = torch.Generator().manual_seed(0)
    B, T = 2, 24
    q, k = torch.randn(B, T, H, D, generator=gen), torch.randn(B, T, H, D, generator=gen)
    # positions beyond the original length, so dynamic really rescales
    pos = torch.stack([torch.arange(T) * 50, torch.arange(T) + 3])  # [B, T]
    hf = LlamaRotaryEmbedding(config())
    cos, sin = hf(q, pos)  # [B, T, D]
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # [B, T, H, D] layout
    # transformers picks the dynamic frequencies from the whole batch's longest position
    if case == "dynamic":
        q_out, k_out = enc.rotate(q, k, pos, pos)
    else:
        q_out, k_out = zip(*(enc.rotate(q[b:b + 1], k[b:b + 1], pos[b], pos[b]) for b in range(B)))
        q_out, k_out = torch.cat(q_out), torch.cat(k_out)
    torch.testing.assert_close(q_out, q_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k_out, k_ref, rtol=1e-4, atol=1e-4)


def test_dynamic_uses_original_frequencies_within_training_length():
    enc = build_encoding("rope", num_heads=H, head_dim=D, scaling="dynamic", factor=4.0, original_max_positions=ORIG)
    plain = build_encoding("rope", num_heads=H, head_dim=D)
    q = torch.randn(1, 8, H, D)
    for pos in (torch.arange(8), torch.arange(ORIG - 8, ORIG)):
        torch.testing.assert_close(enc.rotate(q, q, pos, pos)[0], plain.rotate(q, q, pos, pos)[0])
    assert not torch.allclose(enc.rotate(q, q, pos + 100, pos + 100)[0], plain.rotate(q, q, pos + 100, pos + 100)[0])


@pytest.mark.parametrize("options", [{}, {"scaling": "linear", "factor": 4.0}, {"scaling": "ntk", "factor": 4.0},
                                     {"scaling": "yarn", "factor": 8.0, "original_max_positions": ORIG}],
                         ids=["none", "linear", "ntk", "yarn"])
def test_scores_depend_only_on_distance(options):
    enc = build_encoding("rope", num_heads=H, head_dim=D, **options)
    gen = torch.Generator().manual_seed(1)
    T = 16
    q, k = torch.randn(1, T, H, D, generator=gen), torch.randn(1, T, H, D, generator=gen)

    def scores(offset):
        pos = torch.arange(T) * 7 + offset
        qr, kr = enc.rotate(q, k, pos, pos)
        return torch.einsum("bthd,bshd->bhts", qr, kr)

    torch.testing.assert_close(scores(1000), scores(0), rtol=1e-4, atol=2e-3)
    # one q and one k vector at every position: the score matrix is Toeplitz in (i, j)
    qc, kc = q[:, :1].expand(1, T, H, D), k[:, :1].expand(1, T, H, D)
    pos = torch.arange(T) + 321
    qr, kr = enc.rotate(qc, kc, pos, pos)
    s = torch.einsum("bthd,bshd->bhts", qr, kr)
    torch.testing.assert_close(s[..., 1:, 1:], s[..., :-1, :-1], rtol=1e-4, atol=2e-3)
    assert (s[..., 0, 1:] - s[..., 0, :-1]).abs().max() > 1e-2  # but not constant


def test_dtype_kv_cache_and_fp32_buffer():
    enc = build_encoding("rope", num_heads=H, head_dim=D, scaling="yarn", factor=4.0, original_max_positions=ORIG)
    q, k = torch.randn(2, 1, H, D), torch.randn(2, 9, H, D)
    q_out, k_out = enc.rotate(q.bfloat16(), k.bfloat16(), torch.tensor([8]), torch.arange(9))
    assert q_out.dtype == k_out.dtype == torch.bfloat16 and q_out.shape == q.shape and k_out.shape == k.shape
    # a decode step (one query at position 8) rotates like the last row of the full sequence
    q_full, _ = enc.rotate(torch.cat([k[:, :8], q], 1), k, torch.arange(9), torch.arange(9))
    torch.testing.assert_close(enc.rotate(q, k, torch.tensor([8]), torch.arange(9))[0], q_full[:, 8:])
    before = enc.inv_freq.clone()
    enc.bfloat16()
    assert enc.inv_freq.dtype == torch.float32 and torch.equal(enc.inv_freq, before)


@pytest.mark.parametrize("options,match", [
    ({"scaling": "ropey"}, "none|linear|ntk|dynamic|yarn"),
    ({"scaling": "yarn", "factor": 2.0}, "original_max_positions"),
    ({"scaling": "dynamic", "factor": 2.0}, "original_max_positions"),
    ({"factor": 2.0}, "linear"),
    ({"scaling": "linear", "factor": 0.5}, ">= 1"),
    ({"partial_rotary_factor": 0.0}, "partial_rotary_factor"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        build_encoding("rope", num_heads=H, head_dim=D, **options)
