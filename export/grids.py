"""Time grids for reverse-time samplers: the times t_i the model is evaluated at and the steps dt_i < 0.

A grid is data computed once, outside the sampling loop, and written into the bundle manifest.

- "diffusers": t_i = linspace(1, eps, N) (torch float32, as ``ScoreSdeVpScheduler.set_timesteps`` and
  score_sde's samplers) with dt_i = -1/N: diffusers' (and score_sde's) choice kept bit for bit. dt is not the
  grid spacing (1 - eps)/(N - 1): equal at N = 1000, 11% off at N = 10, and the last step overshoots below eps.
- "uniform": N equal steps from t = 1 down to t = eps (N + 1 edges).
- "logsnr": N + 1 edges equally spaced in lambda(t) = log(alpha(t) / sigma(t)) from t = 1 to t = eps, the
  spacing DPM-Solver recommends for few-step sampling (denser near t = eps).
- "edm": Karras et al.'s (EDM) discretisation, N + 1 edges equally spaced in sigma^(1/rho), rho = 7, where
  sigma = sigma(t) / alpha(t) = e^(-lambda) is the noise level of x / alpha, from t = 1 to t = eps. "logsnr"
  (geometric in sigma) is its limit rho -> inf; at rho = 7 the steps are shorter at high noise and longer near
  t = eps.
"""

from __future__ import annotations

from typing import Literal

import torch

from vpsde.models.sde import VPSDE

Grid = Literal["diffusers", "uniform", "logsnr", "edm"]
GRIDS: tuple[str, ...] = ("diffusers", "uniform", "logsnr", "edm")
EDGE_GRIDS: tuple[str, ...] = ("uniform", "logsnr", "edm")
EDM_RHO = 7.0


def log_snr(sde: VPSDE, t: torch.Tensor) -> torch.Tensor:
    """lambda(t) = log(alpha(t) / sigma(t)), half the log signal-to-noise ratio; decreasing in t."""
    return sde.log_mean_coeff(t) - torch.log(sde.std(t))


def t_from_log_snr(sde: VPSDE, lam: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`log_snr` for the linear VP schedule (closed form):
    t = 2 L / (beta_min + sqrt(beta_min^2 + 2 (beta_max - beta_min) L)),  L = log(1 + e^{-2 lambda})."""
    big_l = torch.nn.functional.softplus(-2.0 * lam)
    b0, b1 = sde.beta_min, sde.beta_max
    return 2.0 * big_l / (b0 + torch.sqrt(b0**2 + 2.0 * (b1 - b0) * big_l))


def grid_edges(grid: str, steps: int, sde: VPSDE) -> torch.Tensor:
    """N + 1 times from 1 down to sde.sampling_eps, float64 [N + 1], for the edge grids ("uniform", "logsnr")."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    eps = sde.sampling_eps
    if grid == "uniform":
        return torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)
    if grid == "logsnr":
        ends = log_snr(sde, torch.tensor([1.0, eps], dtype=torch.float64))
        edges = t_from_log_snr(sde, torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=torch.float64))
        edges[0], edges[-1] = 1.0, eps  # exact end points (the closed form is accurate to ~1e-15)
        return edges
    if grid == "edm":
        s_max, s_min = torch.exp(-log_snr(sde, torch.tensor([1.0, eps], dtype=torch.float64))) ** (1.0 / EDM_RHO)
        sigma = (s_max + torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64) * (s_min - s_max)) ** EDM_RHO
        edges = t_from_log_snr(sde, -torch.log(sigma))
        edges[0], edges[-1] = 1.0, eps
        return edges
    raise ValueError(f"grid {grid!r} has no edges; expected one of {', '.join(EDGE_GRIDS)}")


def time_grid(grid: str, steps: int, sampling_eps: float | VPSDE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Times, steps and sqrt(-steps) of an N-step reverse SDE sampler: (t, dt, sqrt_neg_dt), float32 tensors [N].

    dt and sqrt_neg_dt are computed in float64 from the exact step and rounded once to float32. The third
    argument is the sampling eps (or the SDE, which "logsnr" needs).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sde = sampling_eps if isinstance(sampling_eps, VPSDE) else VPSDE(sampling_eps=sampling_eps)
    if grid == "diffusers":
        t = torch.linspace(1.0, sde.sampling_eps, steps, dtype=torch.float32)
        dt64 = torch.full((steps,), -1.0 / steps, dtype=torch.float64)
    elif grid in EDGE_GRIDS:
        edges = grid_edges(grid, steps, sde)
        t, dt64 = edges[:-1].float(), edges[1:] - edges[:-1]
    else:
        raise ValueError(f"unknown grid {grid!r}; expected one of {', '.join(GRIDS)}")
    return t, dt64.float(), torch.sqrt(-dt64).float()


def discrete_betas(steps: int, sde: VPSDE) -> tuple[torch.Tensor, torch.Tensor]:
    """score_sde's discretisation of an N-step chain: (t, beta), float32 [N]: t_i = linspace(1, eps, N) and
    beta_i = linspace(beta_min/N, beta_max/N, N)[int(t_i (N - 1))], in score_sde's float32 arithmetic.
    Valid while beta_max / N < 1."""
    t = torch.linspace(1.0, sde.sampling_eps, steps, dtype=torch.float32)
    betas = torch.linspace(sde.beta_min / steps, sde.beta_max / steps, steps, dtype=torch.float32)
    return t, betas[(t * (steps - 1) / 1.0).long()]


def respaced_betas(edges: torch.Tensor, sde: VPSDE) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDPM chain respaced onto the edges t_0 = 1 > ... > t_N (float64 [N + 1]) -> (t, beta), float64 [N]:
    beta_i = 1 - abar(t_i) / abar(t_{i+1}) with abar = alpha^2, the one-step variance of the forward chain
    from t_{i+1} to t_i, in (0, 1) at every N (score_sde's linspace betas reach 1 at N = beta_max)."""
    lmc = sde.log_mean_coeff(edges)
    return edges[:-1], -torch.expm1(2.0 * (lmc[:-1] - lmc[1:]))
