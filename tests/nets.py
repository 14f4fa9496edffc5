"""Small hand-built torch networks shared by the diagnostics and finite-difference tests
(imported only after those tests have checked that torch is installed)."""

from __future__ import annotations

import torch
from torch import nn


def kinky_relu():
    """1 -> 3 -> 1 ReLU net with kinks at x = 0.5, 0, -0.5 (pre-activations x - 0.5, x, x + 0.5)."""
    net = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.copy_(torch.tensor([-0.5, 0.0, 0.5]))
        net[2].weight.copy_(torch.tensor([[1.0, 2.0, -1.0]]))
        net[2].bias.zero_()
    return net


def cancelling_net(dtype=torch.float32, delta=1e-5):
    """y = (tanh(x + delta) - tanh(x)) / delta: large nearly-cancelling weights, so float32
    loses about five digits in y and its derivatives (float64 does not)."""
    net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.copy_(torch.tensor([0.0, delta]))
        net[2].weight.copy_(torch.tensor([[-1 / delta, 1 / delta]]))
    return net.to(dtype)
