"""Sampler recipes: which step graphs a sampler exports, the program of calls per step, and its schedule.

A recipe is everything ``export_bundle`` writes besides the model: the step modules (one graph each), the
per-step call program, the schedule arrays (float64 here, rounded once to float32 in the manifest), the
host-carried state and the conditioning inputs. The runtime executes it without knowing which sampler it is.

    sampler    graphs (program per step)          schedule inputs                      NFE per step
    em         em                                 t, dt, sqrt_neg_dt                   1
    pc         langevin x n, reverse_diffusion    t, beta (DDPM betas of the grid)     n + 1
    ancestral  ancestral                          t, beta                              1
    ode-euler  ode_euler                          t, dt                                1
    ode-heun   ode_heun                           t, dt, t_next                        2
    dpmpp-2m   dpmpp_2m  (state x0_prev <- x0)    t, alpha, sigma, c_x, c_d, w_*       1
    inpaint    inpaint_em (conditioning known, mask)   t, dt, sqrt_neg_dt               1
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vpsde.export.grids import EDGE_GRIDS, GRIDS, discrete_betas, grid_edges, log_snr, respaced_betas, time_grid
from vpsde.export.steps import (COUPLINGS, DiscretePredictorStep, DPMSolverPP2MStep, EulerMaruyamaStep, InpaintStep,
                                LangevinCorrectorStep, ProbabilityFlowStep)
from vpsde.models.base import ScoreModel
from vpsde.models.sde import VPSDE
from vpsde.runtime.manifest import ProgramCall, StateSpec

SAMPLERS: dict[str, str] = {
    "em": "euler-maruyama",
    "pc": "predictor-corrector",
    "ancestral": "ancestral",
    "ode-euler": "probability-flow-euler",
    "ode-heun": "probability-flow-heun",
    "dpmpp-2m": "dpm-solver++(2m)",
    "inpaint": "inpaint-euler-maruyama",
}
"""Sampler id (CLI ``--sampler``) -> the name written to ``sampler.name``."""

SAMPLER_GRIDS: dict[str, tuple[str, ...]] = {
    "em": GRIDS, "inpaint": GRIDS,
    "pc": GRIDS, "ancestral": GRIDS,  # "diffusers": score_sde's linspace betas; edge grids: respaced DDPM betas
    "ode-euler": EDGE_GRIDS, "ode-heun": EDGE_GRIDS, "dpmpp-2m": EDGE_GRIDS,
}
DEFAULT_GRID: dict[str, str] = {"em": "diffusers", "inpaint": "diffusers", "pc": "diffusers",
                                "ancestral": "diffusers", "ode-euler": "logsnr", "ode-heun": "logsnr",
                                "dpmpp-2m": "logsnr"}
LOWER_ORDER_FINAL_BELOW = 15
"""DPM-Solver++(2M) takes a first-order last step when N < 15 (as DPM-Solver and diffusers do): stabler at
very few steps."""


@dataclass
class SamplerRecipe:
    """What to export for one sampler: graph key -> step module, the per-step program, the schedule (float64
    [N] arrays by graph input name), final output, state, conditioning, noise inputs, and parameters."""

    sampler: str
    name: str
    grid: str
    steps: int
    graphs: dict[str, nn.Module]
    program: list[ProgramCall]
    schedule: dict[str, torch.Tensor]
    final: str = "x_mean"
    state: list[StateSpec] = field(default_factory=list)
    conditioning: list[str] = field(default_factory=list)
    noise_inputs: list[str] = field(default_factory=lambda: ["noise"])
    params: dict[str, int | float | str] = field(default_factory=dict)

    @property
    def nfe(self) -> int:
        """Score-model evaluations per sample over the whole loop."""
        return int(self.params["nfe"])


def steps_for_nfe(sampler: str, nfe: int, corrector_steps: int = 1) -> int:
    """The step count N that spends ``nfe`` model evaluations (rounded down, at least 1)."""
    per_step = {"pc": corrector_steps + 1, "ode-heun": 2}.get(sampler, 1)
    return max(1, nfe // per_step)


def build_sampler(sampler: str, model: ScoreModel, sde: VPSDE, steps: int, grid: str | None = None, *,
                  snr: float = 0.16, corrector_steps: int = 1, coupling: str = "expected",
                  denoise_final: bool = False) -> SamplerRecipe:
    """The recipe of ``sampler`` with ``steps`` steps on ``grid`` (default: the sampler's, see DEFAULT_GRID).

    ``snr``, ``corrector_steps`` and ``coupling`` configure the Langevin corrector of "pc" (score_sde defaults:
    snr 0.16, one corrector step, batch-averaged norms; here the norms' expectations by default, see
    :class:`LangevinCorrectorStep` and docs/samplers.md for the measurements behind it).
    ``denoise_final`` (dpmpp-2m): the last of the N steps goes from t = eps to t = 0, so the sample is the
    model's data prediction at eps (diffusers' ``final_sigmas_type="zero"``); the first N - 1 steps span the
    grid from 1 to eps.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    grid = grid or DEFAULT_GRID[sampler]
    if grid not in SAMPLER_GRIDS[sampler]:
        raise ValueError(f"sampler {sampler!r} runs on the grids {', '.join(SAMPLER_GRIDS[sampler])}, not {grid!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if denoise_final and sampler != "dpmpp-2m":
        raise ValueError("denoise_final is a dpmpp-2m option")
    common = dict(sampler=sampler, name=SAMPLERS[sampler], grid=grid, steps=steps)

    if sampler in ("em", "inpaint"):
        t, dt, sqrt_neg_dt = time_grid(grid, steps, sde)
        step = EulerMaruyamaStep(model, sde)
        schedule = {"t": t.double(), "dt": dt.double(), "sqrt_neg_dt": sqrt_neg_dt.double()}
        if sampler == "em":
            return SamplerRecipe(**common, graphs={step.kind: step}, program=[ProgramCall(step.kind)],
                                 schedule=schedule, params={"nfe": steps})
        wrapped = InpaintStep(step)
        return SamplerRecipe(**common, graphs={wrapped.kind: wrapped}, program=[ProgramCall(wrapped.kind)],
                             schedule=schedule, conditioning=["known", "mask"], noise_inputs=["noise", "known_noise"],
                             params={"nfe": steps})

    if sampler in ("pc", "ancestral"):
        if grid == "diffusers":
            t, beta = (a.double() for a in discrete_betas(steps, sde))
            if beta.max() > 1 or (sampler == "ancestral" and beta.max() >= 1):  # ancestral divides by sqrt(1 - beta)
                raise ValueError(f"{sampler} on the 'diffusers' grid uses score_sde's betas "
                                 f"linspace(beta_min/N, beta_max/N, N), which reach {beta.max():.3g} at N = {steps}; "
                                 f"use more than {int(sde.beta_max)} steps, or --grid uniform|logsnr (respaced betas)")
        else:
            t, beta = respaced_betas(grid_edges(grid, steps, sde).float().double(), sde)
        schedule = {"t": t, "beta": beta}
        if sampler == "ancestral":
            step = DiscretePredictorStep(model, sde, "ancestral")
            return SamplerRecipe(**common, graphs={step.kind: step}, program=[ProgramCall(step.kind)],
                                 schedule=schedule, params={"nfe": steps})
        if corrector_steps < 1:
            raise ValueError(f"corrector_steps must be >= 1, got {corrector_steps}")
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        corrector = LangevinCorrectorStep(model, sde, snr, coupling)
        predictor = DiscretePredictorStep(model, sde, "reverse-diffusion")
        return SamplerRecipe(**common, graphs={corrector.kind: corrector, predictor.kind: predictor},
                             program=[ProgramCall(corrector.kind, corrector_steps), ProgramCall(predictor.kind)],
                             schedule=schedule,
                             params={"nfe": steps * (corrector_steps + 1), "snr": float(snr),
                                     "corrector_steps": corrector_steps, "coupling": coupling,
                                     "predictor": "reverse-diffusion", "corrector": "langevin"})

    # deterministic samplers on N + 1 edges: the model sees the float32-rounded times, and every coefficient
    # is computed in float64 from those rounded times
    if denoise_final and steps < 2:
        raise ValueError("denoise_final needs steps >= 2 (the last step is the jump to t = 0)")
    edges = grid_edges(grid, steps - int(denoise_final), sde).float().double()
    if denoise_final:
        edges = torch.cat([edges, torch.zeros(1, dtype=torch.float64)])
    t, t_next = edges[:-1], edges[1:]
    if sampler in ("ode-euler", "ode-heun"):
        order = 1 if sampler == "ode-euler" else 2
        step = ProbabilityFlowStep(model, sde, order)
        schedule = {"t": t, "dt": t_next - t}
        if order == 2:
            schedule["t_next"] = t_next
        return SamplerRecipe(**common, graphs={step.kind: step}, program=[ProgramCall(step.kind)], schedule=schedule,
                             final="x_next", noise_inputs=[], params={"nfe": steps * order})

    step = DPMSolverPP2MStep(model, sde)
    return SamplerRecipe(**common, graphs={step.kind: step}, program=[ProgramCall(step.kind)],
                         schedule=dpmpp_2m_schedule(sde, edges), final="x_next", noise_inputs=[],
                         state=[StateSpec(input="x0_prev", output="x0")],
                         params={"nfe": steps, "lower_order_final": int(steps < LOWER_ORDER_FINAL_BELOW),
                                 "denoise_final": int(denoise_final)})


def dpmpp_2m_schedule(sde: VPSDE, edges: torch.Tensor) -> dict[str, torch.Tensor]:
    """Coefficients of DPM-Solver++(2M) on the edges t_0 = 1 > ... > t_N (float64 [N + 1]; t_N = eps, or 0 for
    a final jump to the data) -> float64 [N] arrays t, alpha, sigma, c_x, c_d, w_cur, w_prev (see
    :class:`DPMSolverPP2MStep`). A step to t = 0 (sigma = 0, h = inf) is first order with c_x = 0, c_d = 1:
    x_next = x0."""
    alpha, sigma, lam = sde.mean_coeff(edges), sde.std(edges), log_snr(sde, edges)
    h = lam[1:] - lam[:-1]  # > 0: lambda grows as t falls; inf for a step to t = 0
    n = h.numel()
    second_order = (torch.arange(n) >= 1) & torch.isfinite(h)
    if n < LOWER_ORDER_FINAL_BELOW:
        second_order[-1] = False
    r = torch.ones(n, dtype=torch.float64)
    r[1:] = h[:-1] / h[1:]
    r = torch.where(second_order, r, torch.ones_like(r))
    w_cur = torch.where(second_order, 1.0 + 0.5 / r, torch.ones_like(r))
    w_prev = torch.where(second_order, -0.5 / r, torch.zeros_like(r))
    return {"t": edges[:-1], "alpha": alpha[:-1], "sigma": sigma[:-1], "c_x": sigma[1:] / sigma[:-1],
            "c_d": -alpha[1:] * torch.expm1(-h), "w_cur": w_cur, "w_prev": w_prev}
