"""attention.backend resolution and its errors."""
from __future__ import annotations

import pytest
from attention_testlib import FakeRotary, RandomBias

from megafire.attention import dispatch, get_attention_fn, reference_attention, resolve_backend, sdpa_attention
from megafire.config import ConfigError
from megafire.positional import build_encoding

BIAS, ROT = RandomBias(4, 8), FakeRotary(4, 8)


def test_auto_choices_on_cpu():
    assert resolve_backend("auto", None, "cpu") == "sdpa"
    assert resolve_backend("auto", ROT, "cpu") == "sdpa"
    assert resolve_backend("auto", BIAS, "cpu") == "reference"
    assert get_attention_fn("auto", BIAS, "cpu") is reference_attention
    assert get_attention_fn("sdpa", ROT, "cpu") is sdpa_attention


def test_auto_on_cuda_uses_fused_only_when_supported(monkeypatch):
    monkeypatch.setattr(dispatch, "_fused_supports", lambda enc: (True, ""))
    monkeypatch.setattr(dispatch, "_fused_module", lambda: object())
    assert resolve_backend("auto", BIAS, "cuda") == "fused"
    assert resolve_backend("fused", BIAS, "cuda") == "fused"
    assert resolve_backend("auto", ROT, "cuda") == "sdpa/fused"    # per call: packed documents -> fused
    assert resolve_backend("auto", None, "cuda") == "sdpa/fused"
    assert get_attention_fn("auto", ROT, "cuda") is dispatch.sdpa_or_fused_attention
    assert resolve_backend("sdpa", ROT, "cuda") == "sdpa"          # the off switch
    assert resolve_backend("fused", ROT, "cuda") == "fused"      # the kernels without a bias term
    assert resolve_backend("fused", None, "cuda") == "fused"
    monkeypatch.setattr(dispatch, "_fused_supports", lambda enc: (False, "no kernel for random_bias"))
    assert resolve_backend("auto", BIAS, "cuda") == "reference"
    monkeypatch.setattr(dispatch, "_fused_module", lambda: None)   # no Triton: SDPA alone
    assert resolve_backend("auto", ROT, "cuda") == "sdpa"
    with pytest.raises(ConfigError, match="attention.backend=fused.*no kernel for random_bias"):
        resolve_backend("fused", BIAS, "cuda")


@pytest.mark.parametrize("backend,encoding,device,match", [
    ("fused", BIAS, "cpu", "attention.backend=fused needs a CUDA device"),
    ("sdpa", BIAS, "cpu", "attention.backend=sdpa cannot add the attention bias"),
    ("sdpa", BIAS, "cuda", "attention.backend=sdpa cannot add the attention bias"),
    ("fused", ROT, "cpu", "attention.backend=fused needs a CUDA device"),
    ("flex", BIAS, "cuda", r"attention.backend=flex is impossible: no FlexAttention score_mod for encoding "
                           r"'random_bias' .*Use reference, fused or auto"),
    ("flex", build_encoding("fire", num_heads=4, head_dim=8, depth=2), "cpu",
     r"attention.backend=flex is impossible: FIRE with depth=2 > 1.*Use reference, fused or auto"),
    ("flex", None, "mps", r"attention.backend=flex runs on cuda and cpu here; tensors are on 'mps'"),
    ("magic", None, "cpu", "attention.backend='magic' is not allowed"),
])
def test_impossible_choices_raise_config_errors(backend, encoding, device, match):
    with pytest.raises(ConfigError, match=match):
        resolve_backend(backend, encoding, device)


@pytest.mark.parametrize("name", ["nope", "rope", "alibi", "kerple_log", "kerple_power", "t5", "fire"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_flex_resolves_for_every_encoding_it_can_express(name, device):
    enc = build_encoding(name, num_heads=4, head_dim=16)
    enc = enc if enc.kind in ("rotary", "bias") else None          # as the attention layer keeps it
    assert resolve_backend("flex", enc, device) == "flex"
    assert get_attention_fn("flex", enc, device) is dispatch._FUNCTIONS["flex"]
    assert resolve_backend("auto", enc, device) != "flex"            # auto never picks flex


def test_choice_is_logged_once(caplog):
    dispatch._logged.clear()
    with caplog.at_level("INFO", logger="megafire.attention.dispatch"):
        for _ in range(3):
            get_attention_fn("auto", BIAS, "cpu")
    assert sum("-> reference" in r.message for r in caplog.records) == 1
