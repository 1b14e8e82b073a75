"""KV-cache decoding equals the full forward, for every registered encoding."""
from __future__ import annotations

import pytest
import torch
from model_testlib import tiny_config

from megafire.model import GPT, KVCache, generate
from megafire.positional import ENCODINGS, encoding_class

# small L so decoding reaches 4x-6x beyond it (FIRE's normalized, "beyond L" regime)
OPTIONS = {"fire": {"init_L": 8.0}, "learned": {"max_positions": 64}}


def build_or_skip(parallel, name, options=None, **model):
    try:
        encoding_class(name)
    except ImportError:
        pytest.skip(f"encoding {name!r} has not landed")
    cfg = tiny_config(name, options if options is not None else OPTIONS.get(name), **model)
    return GPT.from_config(cfg, parallel, seed=1).eval()


def decode_incrementally(model, x, positions, prompt_len, segment_ids=None, step=1):
    """Prompt in one forward, then `step` tokens at a time -> concatenated logits."""
    cache = KVCache(len(model.blocks))
    sl = lambda t, a, b: None if t is None else t[..., a:b]
    outs = [model(x[:, :prompt_len], sl(positions, 0, prompt_len), sl(segment_ids, 0, prompt_len), cache)]
    for t in range(prompt_len, x.shape[1], step):
        outs.append(model(x[:, t:t + step], sl(positions, t, t + step), sl(segment_ids, t, t + step), cache))
    assert len(cache) == x.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", [*ENCODINGS, "toy_bias"])
@torch.no_grad()
def test_decode_equals_full_forward(parallel, name):
    model = build_or_skip(parallel, name)
    torch.manual_seed(0)
    T = 34                                                                # > 4x FIRE's L = 8
    x = torch.randint(0, 64, (2, T))
    positions = torch.arange(T)
    full = model(x, positions)
    torch.testing.assert_close(decode_incrementally(model, x, positions, 6), full, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(decode_incrementally(model, x, positions, 9, step=4), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [*ENCODINGS, "toy_bias"])
@torch.no_grad()
def test_decode_with_batched_positions_and_segments(parallel, name):
    """[B, T] positions with an offset row, and packed documents, through the cache."""
    model = build_or_skip(parallel, name)
    torch.manual_seed(1)
    T = 24
    x = torch.randint(0, 64, (2, T))
    positions = torch.stack([torch.arange(T), torch.arange(T) + 13])
    segments = torch.stack([torch.zeros(T, dtype=torch.long), (torch.arange(T) >= 10).long()])
    positions[1, 10:] = torch.arange(T - 10)                              # document 2 restarts at 0
    full = model(x, positions, segments)
    torch.testing.assert_close(decode_incrementally(model, x, positions, 5, segments), full,
                               atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_fire_decodes_far_beyond_L_and_training_length(parallel):
    """FIRE with L = 8: query positions up to 4x-8x L, and a prompt starting at position 100."""
    model = build_or_skip(parallel, "fire", {"init_L": 8.0, "learn_L": True})
    torch.manual_seed(2)
    x = torch.randint(0, 64, (1, 64))
    for start, prompt, step in ((0, 24, 1), (100, 4, 6)):                 # queries up to 8x L; 20x L
        positions = torch.arange(64) + start
        full = model(x, positions)
        torch.testing.assert_close(decode_incrementally(model, x, positions, prompt, step=step), full,
                                   atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_generate_is_greedy_argmax_of_full_forward(parallel):
    model = build_or_skip(parallel, "toy_bias")
    prompt = torch.randint(0, 64, (2, 4))
    out = generate(model, prompt, 6)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt)
    logits = model(out, torch.arange(10))
    torch.testing.assert_close(out[:, 4:], logits[:, 3:-1].argmax(-1))


@torch.no_grad()
def test_generate_stops_at_eos(parallel):
    model = build_or_skip(parallel, "nope")
    prompt = torch.randint(0, 64, (1, 3))
    first = generate(model, prompt, 1)[0, -1].item()
    out = generate(model, prompt, 8, eos_id=first)
    assert out.shape == (1, 4) and out[0, -1].item() == first


def test_cache_segment_consistency_is_checked(parallel):
    model = build_or_skip(parallel, "nope")
    cache = model.new_cache()
    model(torch.randint(0, 64, (1, 3)), torch.arange(3), torch.zeros(1, 3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="segment ids"):
        model(torch.randint(0, 64, (1, 1)), torch.tensor([3]), None, cache)


@torch.no_grad()
def test_shared_fire_is_one_module_and_decodes(parallel):
    """FIRE-S: one encoding instance serves every layer (parameters counted once)."""
    model = build_or_skip(parallel, "fire", {"init_L": 8.0, "shared": True}, num_layers=3)
    encs = {id(b.attn.encoding) for b in model.blocks}
    assert len(encs) == 1 and len(model.encodings) == 1
    n_enc = sum(p.numel() for p in model.encodings[0].parameters())
    per_layer = build_or_skip(parallel, "fire", {"init_L": 8.0}, num_layers=3)
    assert (sum(p.numel() for p in per_layer.parameters()) - sum(p.numel() for p in model.parameters())
            == 2 * n_enc)
    x = torch.randint(0, 64, (1, 36))
    torch.testing.assert_close(decode_incrementally(model, x, torch.arange(36), 5), model(x, torch.arange(36)),
                               atol=2e-5, rtol=1e-4)
