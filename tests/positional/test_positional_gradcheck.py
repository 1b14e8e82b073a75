"""Every learnable parameter gets a correct gradient (float64 gradcheck on tiny sizes)."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from megafire.positional import build_encoding


class _Call(nn.Module):
    """Routes forward() to an encoding's bias()/embed() so functional_call can swap its parameters."""

    def __init__(self, enc):
        super().__init__()
        self.enc = enc

    def forward(self, *args):
        return self.enc.bias(*args) if self.enc.kind == "bias" else self.enc.embed(*args)


CASES = {
    "kerple_log": {},
    "kerple_power": {},
    "t5": {"num_buckets": 8, "max_distance": 16},
    "fire": {"width": 6, "init_L": 5.5},  # L between positions: rows on both sides, no max() tie
    "fire_depth2": {"width": 4, "depth": 2, "init_L": 5.5},
}


def check_encoding(enc, args):
    enc = enc.double()
    names = [n for n, p in enc.named_parameters() if p.requires_grad]
    params = tuple(p.detach().clone().requires_grad_(True) for n, p in enc.named_parameters() if p.requires_grad)
    call = _Call(enc)

    def fn(*ps):
        return functional_call(call, {f"enc.{n}": p for n, p in zip(names, ps)}, args)

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-5, rtol=1e-4)
    # and no parameter is disconnected (gradcheck alone accepts an all-zero gradient)
    grads = torch.autograd.grad(fn(*params).square().sum(), params)
    for name, g in zip(names, grads):
        assert g.abs().max() > 0, f"no gradient reaches {name}"
    return names


@pytest.mark.parametrize("case", list(CASES))
def test_bias_gradcheck(case):
    torch.manual_seed(0)
    name = case.split("_depth")[0]
    enc = build_encoding(name, num_heads=2, head_dim=4, **CASES[case])
    if name == "fire":
        with torch.no_grad():  # non-zero hidden biases so every ReLU unit is alive somewhere
            enc.mlp[0].bias.uniform_(-0.5, 0.5)
    pos = torch.arange(10) if name != "t5" else torch.arange(0, 40, 2)  # T5: reach the log buckets too
    names = check_encoding(enc, (pos, pos))
    if name == "fire":
        assert {"c_raw", "L_mult"} <= set(names)


def test_learned_gradcheck():
    torch.manual_seed(0)
    enc = build_encoding("learned", num_heads=2, head_dim=2, max_positions=6)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    check_encoding(enc, (x, torch.tensor([0, 1, 2, 0, 5])))
