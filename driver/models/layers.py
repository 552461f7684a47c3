"""Linear layers whose weights carry a leading committee-member axis, so K members run as one bmm."""
from __future__ import annotations

import math

import torch
from torch import nn


class StackedLinear(nn.Module):
    """y[k] = x[k] @ W[k] * gain + b[k] for K members; x: (K, M, n_in) -> (K, M, n_out).

    ``ntk=True`` is the neural-tangent-kernel parametrisation of GM-NN: weights drawn from N(0, 1) and the
    layer multiplies by 1/sqrt(n_in), so every layer starts at unit scale whatever its width.
    """

    def __init__(self, n_members: int, n_in: int, n_out: int, bias: bool = True, ntk: bool = True):
        super().__init__()
        self.ntk = ntk
        std = 1.0 if ntk else 1.0 / math.sqrt(n_in)
        self.weight = nn.Parameter(torch.randn(n_members, n_in, n_out) * std)
        self.bias = nn.Parameter(torch.zeros(n_members, 1, n_out)) if bias else None
        self.gain = 1.0 / math.sqrt(n_in) if ntk else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight) * self.gain if self.gain != 1.0 else torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias, x, self.weight, alpha=self.gain)


def shifted_softplus(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.softplus(x) - math.log(2.0)
