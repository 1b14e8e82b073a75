"""T5 causal buckets against transformers' T5Attention._relative_position_bucket."""
import pytest
import torch
from transformers.models.t5.modeling_t5 import T5Attention

from megafire.positional import build_encoding
from megafire.positional.t5 import t5_causal_bucket


def hf_bucket(i, j):
    # transformers' relative_position is memory - query = j - i
    return T5Attention._relative_position_bucket(j - i, bidirectional=False, num_buckets=32, max_distance=128)


def test_buckets_equal_transformers():
    q_pos, k_pos = torch.arange(700), torch.arange(700)
    rel = q_pos[:, None] - k_pos[None, :]
    ours = t5_causal_bucket(rel, 32, 128)
    theirs = hf_bucket(q_pos[:, None], k_pos[None, :])
    assert torch.equal(ours, theirs.long())
    assert ours.min() == 0 and ours.max() == 31


@pytest.mark.parametrize("num_buckets,max_distance", [(16, 64), (64, 1000)])
def test_buckets_other_sizes(num_buckets, max_distance):
    rel = torch.arange(-5, 3000)
    theirs = T5Attention._relative_position_bucket(-rel, bidirectional=False, num_buckets=num_buckets,
                                                    max_distance=max_distance)
    assert torch.equal(t5_causal_bucket(rel, num_buckets, max_distance), theirs.long())


def test_bias_is_table_lookup_and_defaults():
    torch.manual_seed(0)
    enc = build_encoding("t5", num_heads=4, head_dim=8)
    assert enc.num_buckets == 32 and enc.max_distance == 128 and enc.shared_across_layers
    assert not build_encoding("t5", num_heads=4, head_dim=8, shared=False).shared_across_layers
    # packed documents: positions restart inside a row
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 200, 201, 202]])
    b = enc.bias(pos, pos)
    assert b.shape == (2, 4, 8, 8) and b.dtype == torch.float32 and torch.isfinite(b).all()
    table = enc.relative_attention_bias.weight
    for n in range(2):
        for a in range(8):
            for c in range(8):
                bucket = hf_bucket(pos[n, a], pos[n, c]).item()
                torch.testing.assert_close(b[n, :, a, c], table[bucket], rtol=0, atol=0)
