"""Registry, option validation, shapes, finiteness and tensor-parallel sharding of every encoding."""
import pytest
import torch

from megafire.positional import ENCODINGS, build_encoding

BIAS = ["alibi", "kerple_log", "kerple_power", "t5", "fire"]


def test_every_name_builds_with_its_kind():
    kinds = {"nope": "none", "learned": "absolute", "sinusoidal": "absolute", "rope": "rotary"}
    assert set(ENCODINGS) == set(kinds) | set(BIAS)
    for name in ENCODINGS:
        enc = build_encoding(name, num_heads=4, head_dim=8)
        assert enc.name == name and enc.kind == kinds.get(name, "bias")


def test_unknown_name_and_option_list_choices():
    with pytest.raises(ValueError, match="allowed: .*alibi.*fire.*rope"):
        build_encoding("xpos", num_heads=4, head_dim=8)
    with pytest.raises(ValueError, match="allowed: .*init_L.*use_log.*width"):
        build_encoding("fire", num_heads=4, head_dim=8, widht=8)


@pytest.mark.parametrize("name,options", [
    ("fire", {"width": 0}), ("fire", {"depth": 0}), ("fire", {"init_c": 0.0}), ("fire", {"init_L": -1.0}),
    ("t5", {"num_buckets": 7}), ("t5", {"max_distance": 8}), ("learned", {"max_positions": 0}),
    ("alibi", {"tp_size": 3}), ("alibi", {"tp_rank": 2, "tp_size": 2}),
])
def test_bad_values(name, options):
    with pytest.raises(ValueError):
        build_encoding(name, num_heads=4, head_dim=8, **options)


@pytest.mark.parametrize("name", BIAS)
def test_bias_shapes_dtype_finite(name):
    enc = build_encoding(name, num_heads=4, head_dim=8)
    b = enc.bias(torch.tensor([3, 4, 5]), torch.arange(8))  # includes masked j > i
    assert b.shape == (4, 3, 8) and b.dtype == torch.float32 and torch.isfinite(b).all()
    pos = torch.tensor([[0, 1, 2, 3], [100, 101, 102, 103]])
    b2 = enc.bias(pos, pos)
    assert b2.shape == (2, 4, 4, 4) and torch.isfinite(b2).all()
    torch.testing.assert_close(b2[1], enc.bias(pos[1], pos[1]))
    assert enc.flops(1000, 10) > 0
    # fp32 out even when the module is cast to bf16 (DeepSpeed bf16)
    assert enc.bfloat16().bias(pos[0], pos[0]).dtype == torch.float32


@pytest.mark.parametrize("name", BIAS)
def test_tp_shards_concatenate_to_full(name):
    def build(rank, size):
        torch.manual_seed(1234)
        return build_encoding(name, num_heads=8, head_dim=8, tp_rank=rank, tp_size=size)

    q_pos, k_pos = torch.tensor([0, 7, 150, 600]), torch.arange(601)
    full = build(0, 1).bias(q_pos, k_pos)
    shards = [build(r, 2) for r in range(2)]
    assert all(s.num_heads_local == 4 for s in shards)
    torch.testing.assert_close(torch.cat([s.bias(q_pos, k_pos) for s in shards]), full, rtol=0, atol=1e-6)
    # and the global RNG advances the same whatever tp_size (later layers init identically)
    build(1, 2)
    after_tp2 = torch.rand(3)
    build(0, 1)
    assert torch.equal(torch.rand(3), after_tp2)
