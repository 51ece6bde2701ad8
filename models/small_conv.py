"""A two-convolution noise predictor with random weights: its Hutchinson likelihood graph exports in seconds (a
UNet's takes a minute or more), for smoke checks, benchmarks and tests."""

from __future__ import annotations

import torch


class SmallConv(torch.nn.Module):
    """eps(x, label) for [B, 1, 8, 8] float32 samples: two 3 x 3 convolutions and a SiLU, with the time fed as a
    constant plane, label / 999 (label = 999 t, t in (0, 1])."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.inp = torch.nn.Conv2d(2, hidden, 3, padding=1)
        self.out = torch.nn.Conv2d(hidden + 1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        t = (label / 999.0).view(-1, 1, 1, 1).expand_as(x)
        return self.out(torch.cat([torch.nn.functional.silu(self.inp(torch.cat([x, t], 1))), t], 1))
