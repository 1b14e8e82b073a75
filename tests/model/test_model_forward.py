"""GPT forward: shapes, tied embeddings, loss, megatron layers vs nn.Linear, determinism, packing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_testlib import tiny_config
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megafire.model import GPT, lm_loss


def build(parallel, position="nope", options=None, seed=0, **model):
    cfg = tiny_config(position, options, **model)
    return GPT.from_config(cfg, parallel, seed=seed), cfg


def test_forward_shapes_and_stages(parallel):
    model, cfg = build(parallel)
    x = torch.randint(0, 64, (3, 11))
    logits = model(x, torch.arange(11))
    assert logits.shape == (3, 11, 64) and torch.isfinite(logits).all()
    assert len(model.stages()) == cfg.model.num_layers + 2
    h = model.embedding(x, torch.arange(11))                             # stages chain as plain tensors
    for block in model.blocks:
        h = block(h, torch.arange(11))
    torch.testing.assert_close(model.head(h, model.embedding.word.weight), logits)


def test_tied_and_untied_embeddings(parallel):
    tied, _ = build(parallel, tie_embeddings=True)
    assert tied.head.output.weight is None
    n_tied = sum(p.numel() for p in tied.parameters())
    untied, cfg = build(parallel, tie_embeddings=False)
    assert untied.head.output.weight.shape == (64, 32)
    assert sum(p.numel() for p in untied.parameters()) == n_tied + 64 * 32
    # tied logits = RMSNorm(h) @ E^T
    x, pos = torch.randint(0, 64, (2, 5)), torch.arange(5)
    h = tied.embedding(x, pos)
    for b in tied.blocks:
        h = b(h, pos)
    torch.testing.assert_close(tied(x, pos), tied.head.norm(h) @ tied.embedding.word.weight.T)
    loss = lm_loss(untied(x, pos), x)
    loss.backward()
    assert untied.head.output.weight.grad is not None


def test_loss_equals_torch_cross_entropy(parallel):
    model, _ = build(parallel)
    x, labels = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 9))
    labels[0, 3] = -100
    mask = torch.ones(2, 9)
    mask[1, :4] = 0
    logits = model(x, torch.arange(9))
    before = logits.detach().clone()
    loss = lm_loss(logits, labels, mask)
    torch.testing.assert_close(logits.detach(), before)                 # input not consumed
    keep = (labels >= 0) & mask.bool()
    expected = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(loss, expected)
    per_token = lm_loss(logits, labels, mask, reduction="none")
    torch.testing.assert_close(per_token[keep], F.cross_entropy(logits[keep], labels[keep], reduction="none"))
    assert (per_token[~keep] == 0).all()
    g1 = torch.autograd.grad(loss, logits)[0]
    g2 = torch.autograd.grad(expected, logits)[0]
    torch.testing.assert_close(g1, g2)


def test_megatron_parallel_linears_equal_nn_linear(parallel):
    mp = parallel.megatron_config()
    init = lambda w: torch.nn.init.normal_(w, std=0.1)
    col = ColumnParallelLinear(16, 24, config=mp, init_method=init, bias=False, gather_output=False,
                               tp_group=parallel.tp_group)
    row = RowParallelLinear(24, 16, config=mp, init_method=init, bias=False, input_is_parallel=True,
                            skip_bias_add=False, tp_group=parallel.tp_group)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = row(col(x)[0])[0]
    ref = F.linear(F.linear(x, col.weight), row.weight)
    torch.testing.assert_close(y, ref)
    gx, = torch.autograd.grad(y.square().sum(), x)
    gx_ref, = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(gx, gx_ref)


def test_init_is_deterministic(parallel):
    a, _ = build(parallel, "toy_bias", seed=3)
    b, _ = build(parallel, "toy_bias", seed=3)
    c, _ = build(parallel, "toy_bias", seed=4)
    for (na, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), na
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)
    state = torch.random.get_rng_state()
    build(parallel, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())              # global RNG untouched


def test_separate_q_kv_projections(parallel):
    cfg = tiny_config()
    fused = GPT.from_config(cfg, parallel, seed=0)
    split = GPT.from_config(cfg, parallel, seed=0, fused_qkv=False)
    # copy fused weights into q / kv layout: per group [q heads..., k, v] -> q | [k, v]
    for bf, bs in zip(fused.blocks, split.blocks):
        w = bf.attn.qkv.weight.view(2, 4, 8, 32)                          # [G, R + 2, D, hidden]
        with torch.no_grad():
            bs.attn.q.weight.copy_(w[:, :2].reshape(-1, 32))
            bs.attn.kv.weight.copy_(w[:, 2:].reshape(-1, 32))
    state = {k: v for k, v in fused.state_dict().items() if "qkv" not in k}
    split.load_state_dict(state, strict=False)
    x = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(split(x, torch.arange(7)), fused(x, torch.arange(7)))


@pytest.mark.parametrize("position", ["nope", "toy_bias", "rope", "fire", "alibi", "t5"])
def test_packed_documents_equal_documents_alone(parallel, position):
    """Document masking + reset positions: each packed document's logits = the document alone."""
    from megafire.positional import encoding_class
    try:
        encoding_class(position)
    except ImportError:
        pytest.skip(f"encoding {position!r} has not landed")
    model, _ = build(parallel, position)
    torch.manual_seed(0)
    lengths = [5, 3, 6]
    docs = [torch.randint(0, 64, (n,)) for n in lengths]
    x = torch.cat(docs).unsqueeze(0)                                      # [1, 14]
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    packed = model(x, positions, segments)
    start = 0
    for doc in docs:
        alone = model(doc.unsqueeze(0), torch.arange(len(doc)))
        torch.testing.assert_close(packed[:, start:start + len(doc)], alone, atol=1e-5, rtol=1e-5)
        start += len(doc)


def test_activation_checkpointing_gives_the_same_gradients(parallel):
    cfg = tiny_config("toy_bias")
    plain = GPT.from_config(cfg, parallel, seed=2)
    ckpt = GPT.from_config(cfg, parallel, seed=2, activation_checkpointing=True)
    x = torch.randint(0, 64, (2, 8))
    for m in (plain, ckpt):
        lm_loss(m(x, torch.arange(8)), x).backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)
