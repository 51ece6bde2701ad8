"""Time grids for reverse-time samplers: the times t_i the model is evaluated at and the steps dt_i < 0.

A grid is data computed once, outside the sampling loop, and written into the bundle manifest.
"""

from __future__ import annotations

from typing import Literal

import torch

Grid = Literal["diffusers", "uniform"]
GRIDS: tuple[str, ...] = ("diffusers", "uniform")


def time_grid(grid: str, steps: int, sampling_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Times, steps and sqrt(-steps) of an N-step reverse sampler: (t, dt, sqrt_neg_dt), float32 tensors [N].

    sqrt_neg_dt is computed in float64 from the exact step and rounded once to float32.

    - "diffusers": t_i = linspace(1, eps, N) (torch float32, as ``ScoreSdeVpScheduler.set_timesteps``) and
      dt_i = -1/N for every step, diffusers' (and score_sde's) choice kept bit for bit. dt is not the grid
      spacing (1 - eps)/(N - 1): equal at N = 1000, 11% off at N = 10, and the last step overshoots below eps.
    - "uniform": N equal steps from t = 1 down to t = eps: t_i = 1 - i (1 - eps)/N, dt_i = t_{i+1} - t_i,
      computed in float64 and rounded to float32, so the steps sum to -(1 - eps).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if grid == "diffusers":
        t = torch.linspace(1.0, sampling_eps, steps, dtype=torch.float32)
        dt64 = torch.full((steps,), -1.0 / steps, dtype=torch.float64)
    elif grid == "uniform":
        edges = torch.linspace(1.0, sampling_eps, steps + 1, dtype=torch.float64)
        t, dt64 = edges[:-1].float(), edges[1:] - edges[:-1]
    else:
        raise ValueError(f"unknown grid {grid!r}; expected one of {', '.join(GRIDS)}")
    return t, dt64.float(), torch.sqrt(-dt64).float()

