"""FIRE's grid interpolation in float64 PyTorch (the function the kernel computes)."""
from __future__ import annotations

import torch


def interp_bias(enc, q_pos, k_pos, grid: int) -> torch.Tensor:
    """enc in float64: f_h replaced by its interpolant on grid + 1 nodes; [(B,) H, Tq, Tk]."""
    x = enc.mlp_input(q_pos, k_pos).to(torch.float64)
    nodes = torch.linspace(0, 1, grid + 1, dtype=torch.float64, device=x.device)
    F = enc.mlp_forward(nodes)  # [G + 1, H]
    t = (x * grid).clamp(0, grid)
    g = t.floor().clamp(max=grid - 1).long()
    w = (t - g).unsqueeze(-1)
    b = F[g] + w * (F[g + 1] - F[g])  # [..., H]
    return b.movedim(-1, -3)


def kink_bound(enc, grid: int) -> torch.Tensor:
    """Per-head bound on |interp - f| for a depth-1 ReLU MLP: (1/(4G)) * max over cells of
    the summed |w2_hk w1_k| of the kinks in the cell."""
    w1 = enc.mlp[0].weight.detach().double().view(-1)
    b1 = enc.mlp[0].bias.detach().double()
    w2 = enc.mlp[2].weight.detach().double()  # [H, width]
    kink = -b1 / w1
    inside = (kink > 0) & (kink < 1) & (w1 != 0)
    cell = (kink * grid).floor().clamp(0, grid - 1).long()
    jump = (w2 * w1).abs() * inside  # [H, width]
    per_cell = torch.zeros(w2.shape[0], grid, dtype=torch.float64).index_add_(1, cell, jump)
    return per_cell.max(1).values / (4 * grid)
