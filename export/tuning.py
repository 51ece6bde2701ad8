"""A time grid tuned to the model at export (GITS, Chen et al. 2024, "On the Trajectory Regularity of ODE-based
Diffusion Sampling", arXiv:2405.11326): dynamic programming over a fine candidate grid against teacher
trajectories of the model's own probability-flow ODE.

1. Candidates: M + 1 times equally spaced in log-SNR from 1 to eps.
2. Teacher: ``samples`` prior draws (torch's generator, ``seed``) carried along the candidates by
   DPM-Solver++(2M) with ``refine`` sub-steps per candidate interval, recording x and eps at every candidate.
3. Cost of jumping from candidate i to j: the mean squared distance between the teacher's x_j and one
   first-order step (DDIM, exact in x / alpha against sigma / alpha) from the teacher's (x_i, eps_i); no model
   call beyond the teacher's. (Squared, so a path's cost adds local errors in quadrature: on the 4-D mixture it
   beat GITS's plain distance; docs/samplers.md.)
4. The N-step grid is the path 0 -> M of N jumps with the least total cost (dynamic programming, O(N M^2)).

The result is only the N + 1 edges: every host runs it like any other grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vpsde.export.grids import grid_edges, log_snr, t_from_log_snr
from vpsde.models.base import ScoreModel
from vpsde.models.sde import VPSDE
from vpsde.runtime.progress import progress

TUNED = "tuned"
"""The grid name a tuned bundle records in ``sampler.grid``."""


@dataclass(frozen=True)
class Tuning:
    """How a grid is tuned; every field goes into the manifest's ``sampler.params`` (prefixed ``tuning_``)."""

    samples: int = 256
    seed: int = 0
    candidates: int = 120
    refine: int = 4
    method: str = "gits-dp-mse"
    teacher: str = "dpm-solver++(2m)"

    def params(self) -> dict[str, int | str]:
        return {f"tuning_{k}": v for k, v in self.__dict__.items()}


def teacher_trajectories(model: ScoreModel, sde: VPSDE, times: torch.Tensor, tuning: Tuning,
                         show_progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x and eps at each of the candidate ``times`` (float64 [M + 1], 1 down to eps) along DPM-Solver++(2M)
    trajectories from ``tuning.samples`` prior draws: two float32 tensors [M + 1, samples, *sample_shape]."""
    fine = torch.cat([torch.linspace(float(a), float(b), tuning.refine + 1, dtype=torch.float64)[:-1]
                      for a, b in zip(log_snr(sde, times[:-1]), log_snr(sde, times[1:]))] + [log_snr(sde, times[-1:])])
    t_fine = t_from_log_snr(sde, fine)
    t_fine[::tuning.refine] = times  # the candidates themselves exactly
    alpha, sigma = sde.mean_coeff(t_fine), sde.std(t_fine)
    generator = torch.Generator().manual_seed(tuning.seed)
    x = torch.randn((tuning.samples, *model.sample_shape), generator=generator)
    xs, eps_at = [], []
    x0_prev, h_prev = None, None
    with torch.no_grad(), progress(len(fine) - 1, "tuning the grid (teacher)", "step", enabled=show_progress) as bar:
        for k in range(len(fine)):
            eps = model(x, torch.full((x.shape[0],), float(t_fine[k]), dtype=torch.float32))
            if k % tuning.refine == 0:
                xs.append(x.clone())
                eps_at.append(eps.clone())
            if k == len(fine) - 1:
                break
            x0 = (x.double() - sigma[k] * eps.double()) / alpha[k]
            h = float(fine[k + 1] - fine[k])
            half_over_r = None if x0_prev is None else h / (2 * h_prev)  # 1 / (2 r), r = h_prev / h
            d = x0 if x0_prev is None else (1 + half_over_r) * x0 - half_over_r * x0_prev
            x = (sigma[k + 1] / sigma[k] * x.double() - alpha[k + 1] * math.expm1(-h) * d).float()
            x0_prev, h_prev = x0, h
            bar.update(1)
    return torch.stack(xs), torch.stack(eps_at)


def jump_costs(sde: VPSDE, times: torch.Tensor, xs: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """cost[i, j] (float64 [M + 1, M + 1], inf unless i < j): the mean square over samples and elements of the
    teacher's x_j minus the DDIM step from (x_i, eps_i) at times[i] to times[j]."""
    alpha, s = sde.mean_coeff(times), sde.std(times) / sde.mean_coeff(times)
    m = len(times)
    cost = torch.full((m, m), float("inf"), dtype=torch.float64)
    flat_x, flat_e = xs.flatten(1).double(), eps.flatten(1).double()
    for i in range(m - 1):
        j = torch.arange(i + 1, m)
        step = (alpha[j] / alpha[i])[:, None] * flat_x[i][None] + (alpha[j] * (s[j] - s[i]))[:, None] * flat_e[i][None]
        cost[i, j] = (step - flat_x[j]).pow(2).mean(dim=1)
    return cost


def best_path(cost: torch.Tensor, steps: int) -> list[int]:
    """The candidate indices 0 = k_0 < k_1 < ... < k_N = M minimising sum cost[k_n, k_{n+1}] (dynamic programming)."""
    m = cost.shape[0]
    if not 1 <= steps <= m - 1:
        raise ValueError(f"a tuned grid of {steps} steps needs more candidates than {m - 1}")
    total = torch.full((steps + 1, m), float("inf"), dtype=torch.float64)
    back = torch.zeros((steps + 1, m), dtype=torch.long)
    total[0, 0] = 0.0
    for n in range(1, steps + 1):
        via = total[n - 1][:, None] + cost  # [from, to]
        total[n], back[n] = via.min(dim=0)
    path = [m - 1]
    for n in range(steps, 0, -1):
        path.append(int(back[n, path[-1]]))
    return path[::-1]


def tuned_edges(model: ScoreModel, sde: VPSDE, steps: int, tuning: Tuning = Tuning(),
                show_progress: bool = True) -> torch.Tensor:
    """The N + 1 edges (float64, 1 down to eps) of the grid tuned to ``model`` (see the module docstring)."""
    if tuning.samples < 1 or tuning.candidates < steps or tuning.refine < 1:
        raise ValueError(f"grid tuning: expected samples >= 1, candidates >= steps ({steps}) and refine >= 1, got "
                         f"{tuning.samples}, {tuning.candidates}, {tuning.refine}")
    times = grid_edges("logsnr", tuning.candidates, sde)
    xs, eps = teacher_trajectories(model, sde, times, tuning, show_progress)
    path = best_path(jump_costs(sde, times, xs, eps), steps)
    return times[path]

