"""perf.fused_loss: the per-token cross entropy of megafire.model.perf equals megatron's
vocab-parallel cross entropy at tp = 1 (values and gradients; ignored labels count zero)."""
import torch


def test_fused_cross_entropy_equals_megatron(parallel):
    from megafire.model.gpt import lm_loss
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :2] = -100                                    # ignored targets
    ref = lm_loss(logits, labels)
    (gref,) = torch.autograd.grad(ref, logits)
    got = lm_loss(logits, labels, fused=True)
    (ggot,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ggot, gref, rtol=1e-5, atol=1e-8)
