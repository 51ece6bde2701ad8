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
    dpmpp-3m   dpmpp_3m  (+ x0_prev2 <- x0_prev_out)  ... + w_prev2                   1
    dpmpp-2m-sde  dpmpp_2m_sde (noise)            ... + c_z                            1
    edm-heun   edm_heun                           t, t_next, c_x, c_e                  2
    ipndm      ipndm  (state e_prev, e_prev2, e_prev3)  t, c_x, c_e, w_cur, w_prev*        1
    unipc      unipc  (state x_prev, x0_prev, ...)    t, alpha, sigma, u, v, c_*, p_*      1
    inpaint    inpaint_em (conditioning known, mask)   t, dt, sqrt_neg_dt               1
    likelihood likelihood (state logdet <- logdet_next)  t, t_mid, t_next, h (forward in time)  4
    colorize   colorize_em (conditioning known)   t, dt, sqrt_neg_dt                   1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from vpsde.export.grids import EDGE_GRIDS, GRIDS, discrete_betas, grid_edges, log_snr, respaced_betas, time_grid
from vpsde.export.likelihood import LikelihoodStep, likelihood_schedule
from vpsde.export.steps import (COUPLINGS, DiscretePredictorStep, DPMSolverPPStep, EDMHeunStep, EulerMaruyamaStep,
                                IPNDMStep, LangevinCorrectorStep, ProbabilityFlowStep, ReplacementStep, UniPCStep)
from vpsde.export.tuning import TUNED
from vpsde.models.base import ScoreModel
from vpsde.models.sde import VPSDE
from vpsde.runtime.manifest import ProgramCall, StateSpec

DEFAULT_SNR: dict[str, float] = {"expected": 0.10, "batch": 0.16, "per-sample": 0.16}
"""The Langevin corrector's default snr by coupling: score_sde's 0.16 for its own (batch) coupling; 0.10 for the
expected-norm one, at the exact-truth floor in 2-D and 4-D where 0.16 was 10-60% above it in 2-D (Langevin
discretisation bias), and the same on the digits model (docs/samplers.md)."""
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
    task: str = "sample"  # or "likelihood": the program starts at the data (runtime.manifest.TASKS)

    @property
    def nfe(self) -> int:
        """Score-model evaluations per sample over the whole loop."""
        return int(self.params["nfe"])


ODE_GRIDS = (*EDGE_GRIDS, TUNED)
"""Grids of the deterministic (probability-flow) samplers: the edge grids and the one tuned to the model."""
UNIPC_VARIANTS = ("bh1", "bh2")
"""UniPC's B(h): h (bh1) or e^h - 1 (bh2), Zhao et al. 2023, section 3.2."""
UNIPC_ORDERS = (2, 3)


@dataclass(frozen=True)
class Options:
    """The samplers' options: the Langevin corrector's (pc), ``denoise_final`` (DPM-Solver++, UniPC), UniPC's
    ``order`` and ``variant``, and the likelihood's ``divergence``, ``probes`` and ``probe``."""

    snr: float | None = None
    corrector_steps: int = 1
    coupling: str = "expected"
    denoise_final: bool = False
    order: int = 3
    variant: str = "bh2"
    edges: torch.Tensor | None = None  # the "tuned" grid's edges (float64 [N + 1]), computed by export_bundle
    divergence: str = "hutchinson"  # likelihood: exact or hutchinson (export/likelihood.py)
    probes: int = 1
    probe: str = "rademacher"


Build = Callable[[dict, ScoreModel, VPSDE, str, int, Options], SamplerRecipe]


@dataclass(frozen=True)
class SamplerDefinition:
    """One sampler: the name written to ``sampler.name``, the grids it runs on and its default, model calls per
    step (a function of ``corrector_steps``), and ``build(common, model, sde, grid, steps, options)``."""

    name: str
    grids: tuple[str, ...]
    default_grid: str
    build: Build
    calls_per_step: Callable[[int], int] = lambda corrector_steps: 1
    denoise_final: bool = False  # takes Options.denoise_final
    task: str = "sample"


def one_graph(common: dict, step: nn.Module, schedule: dict, nfe: int, **fields) -> SamplerRecipe:
    """A recipe whose program is one call of one step graph per step."""
    return SamplerRecipe(**common, graphs={step.kind: step}, program=[ProgramCall(step.kind)], schedule=schedule,
                         params={"nfe": nfe, **fields.pop("params", {})}, **fields)


def em_schedule(grid: str, steps: int, sde: VPSDE) -> dict[str, torch.Tensor]:
    t, dt, sqrt_neg_dt = time_grid(grid, steps, sde)
    return {"t": t.double(), "dt": dt.double(), "sqrt_neg_dt": sqrt_neg_dt.double()}


def em(common, model, sde, grid, steps, o):
    return one_graph(common, EulerMaruyamaStep(model, sde), em_schedule(grid, steps, sde), steps)


def replacement(mode: str) -> Build:
    """EM with the known part of each sample replaced after every step: inpaint (known, mask) or colorize (known)."""
    def build(common, model, sde, grid, steps, o):
        if mode == "colorize" and model.sample_shape[0] != 3:
            raise ValueError(f"colorize needs 3 channels on the first sample axis, got sample shape "
                             f"{list(model.sample_shape)}")
        return one_graph(common, ReplacementStep(EulerMaruyamaStep(model, sde), mode), em_schedule(grid, steps, sde), steps,
                         conditioning=["known", "mask"] if mode == "inpaint" else ["known"],
                         noise_inputs=["noise", "known_noise"])
    return build


def discrete_schedule(sampler: str, grid: str, steps: int, sde: VPSDE) -> dict[str, torch.Tensor]:
    """t and the DDPM betas of the grid: score_sde's linspace betas on "diffusers", respaced betas otherwise."""
    if grid != "diffusers":
        t, beta = respaced_betas(grid_edges(grid, steps, sde).float().double(), sde)
        return {"t": t, "beta": beta}
    t, beta = (a.double() for a in discrete_betas(steps, sde))
    if beta.max() > 1 or (sampler == "ancestral" and beta.max() >= 1):  # ancestral divides by sqrt(1 - beta)
        raise ValueError(f"{sampler} on the 'diffusers' grid uses score_sde's betas "
                         f"linspace(beta_min/N, beta_max/N, N), which reach {beta.max():.3g} at N = {steps}; "
                         f"use more than {int(sde.beta_max)} steps, or --grid uniform|logsnr (respaced betas)")
    return {"t": t, "beta": beta}


def ancestral(common, model, sde, grid, steps, o):
    return one_graph(common, DiscretePredictorStep(model, sde, "ancestral"),
                     discrete_schedule("ancestral", grid, steps, sde), steps)


def pc(common, model, sde, grid, steps, o):
    schedule = discrete_schedule("pc", grid, steps, sde)
    if o.corrector_steps < 1:
        raise ValueError(f"corrector_steps must be >= 1, got {o.corrector_steps}")
    if o.coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {COUPLINGS}, got {o.coupling!r}")
    snr = DEFAULT_SNR[o.coupling] if o.snr is None else o.snr
    corrector = LangevinCorrectorStep(model, sde, snr, o.coupling)
    predictor = DiscretePredictorStep(model, sde, "reverse-diffusion")
    return SamplerRecipe(**common, graphs={corrector.kind: corrector, predictor.kind: predictor},
                         program=[ProgramCall(corrector.kind, o.corrector_steps), ProgramCall(predictor.kind)],
                         schedule=schedule,
                         params={"nfe": steps * (o.corrector_steps + 1), "snr": float(snr),
                                 "corrector_steps": o.corrector_steps, "coupling": o.coupling,
                                 "predictor": "reverse-diffusion", "corrector": "langevin"})


def edges_of(grid: str, steps: int, sde: VPSDE, denoise_final: bool = False,
             tuned: torch.Tensor | None = None) -> torch.Tensor:
    """The N + 1 edges of a deterministic sampler, float64: the model sees the float32-rounded times, and every
    coefficient is computed in float64 from those rounded times; ``denoise_final`` adds a last jump to t = 0.
    The "tuned" grid's edges are ``tuned`` (``export/tuning.py``: they depend on the model)."""
    if grid == TUNED:
        if tuned is None or tuned.numel() != steps - int(denoise_final) + 1:
            raise ValueError("the tuned grid is computed from the model at export: export_bundle(..., grid='tuned')")
        edges = tuned.double().float().double()
    else:
        edges = grid_edges(grid, steps - int(denoise_final), sde).float().double()
    return torch.cat([edges, torch.zeros(1, dtype=torch.float64)]) if denoise_final else edges


def tuned_edges_in(schedule: Mapping[str, Sequence[float]], denoise_final: bool, sde: VPSDE) -> torch.Tensor:
    """The tuned edges (float64, 1 down to eps) a bundle exported on the "tuned" grid holds: its schedule row ``t``
    is every edge but the last (eps), or with ``denoise_final`` every one (the jump to t = 0 follows them)."""
    t = torch.tensor(list(schedule["t"]), dtype=torch.float64)
    return t if denoise_final else torch.cat([t, torch.tensor([sde.sampling_eps], dtype=torch.float64)])


def ode(order: int) -> Build:
    """The probability-flow ODE by Euler (order 1) or Heun (order 2)."""
    def build(common, model, sde, grid, steps, o):
        edges = edges_of(grid, steps, sde, tuned=o.edges)
        schedule = {"t": edges[:-1], "dt": edges[1:] - edges[:-1], **({"t_next": edges[1:]} if order == 2 else {})}
        return one_graph(common, ProbabilityFlowStep(model, sde, order), schedule, steps * order, final="x_next",
                         noise_inputs=[])
    return build


def edm_heun(common, model, sde, grid, steps, o):
    return one_graph(common, EDMHeunStep(model, sde), edm_heun_schedule(sde, edges_of(grid, steps, sde, tuned=o.edges)), 2 * steps,
                     final="x_next", noise_inputs=[])


def dpmpp(order: int, stochastic: bool) -> Build:
    """DPM-Solver++(2M) / (3M), or SDE-DPM-Solver++(2M): the previous data predictions carried as state."""
    def build(common, model, sde, grid, steps, o):
        edges = edges_of(grid, steps, sde, o.denoise_final, o.edges)
        state = [StateSpec(input="x0_prev", output="x0")]
        if order == 3:
            state.append(StateSpec(input="x0_prev2", output="x0_prev_out"))
        return one_graph(common, DPMSolverPPStep(model, sde, order, stochastic),
                         dpmpp_schedule(sde, edges, order, stochastic), steps, final="x_next",
                         noise_inputs=["noise"] if stochastic else [], state=state,
                         params={"lower_order_final": int(steps < LOWER_ORDER_FINAL_BELOW),
                                 "denoise_final": int(o.denoise_final)})
    return build


def ipndm(common, model, sde, grid, steps, o):
    state = [StateSpec(input="e_prev", output="e"), StateSpec(input="e_prev2", output="e_prev_out"),
             StateSpec(input="e_prev3", output="e_prev2_out")]
    return one_graph(common, IPNDMStep(model, sde), ipndm_schedule(sde, edges_of(grid, steps, sde, tuned=o.edges)), steps,
                     final="x_next", noise_inputs=[], state=state)


def unipc(common, model, sde, grid, steps, o):
    if o.order not in UNIPC_ORDERS or o.variant not in UNIPC_VARIANTS:
        raise ValueError(f"unipc: order must be one of {UNIPC_ORDERS} and variant one of {UNIPC_VARIANTS}, got "
                         f"{o.order}, {o.variant!r}")
    edges = edges_of(grid, steps, sde, o.denoise_final, o.edges)
    state = [StateSpec(input="x_prev", output="x_c"), StateSpec(input="x0_prev", output="x0"),
             StateSpec(input="x0_prev2", output="x0_prev_out")]
    if o.order == 3:
        state.append(StateSpec(input="x0_prev3", output="x0_prev2_out"))
    return one_graph(common, UniPCStep(model, sde, o.order), unipc_schedule(sde, edges, o.order, o.variant), steps,
                     final="x_next", noise_inputs=[], state=state,
                     params={"order": o.order, "variant": o.variant, "denoise_final": int(o.denoise_final)})


def likelihood(common, model, sde, grid, steps, o):
    step = LikelihoodStep(model, sde, o.divergence, o.probes, o.probe)
    params = {"divergence": o.divergence, "solver": "rk4"}
    if o.divergence == "hutchinson":
        params.update(probes=o.probes, probe=o.probe)
    return one_graph(common, step, likelihood_schedule(edges_of(grid, steps, sde)), 4 * steps, final="logp",
                     noise_inputs=step.probe_inputs, state=[StateSpec(input="logdet", output="logdet_next")],
                     params=params, task="likelihood")


DEFINITIONS: dict[str, SamplerDefinition] = {
    "em": SamplerDefinition("euler-maruyama", GRIDS, "diffusers", em),
    # "diffusers": score_sde's linspace betas; edge grids: respaced DDPM betas
    "pc": SamplerDefinition("predictor-corrector", GRIDS, "diffusers", pc, lambda corrector_steps: corrector_steps + 1),
    "ancestral": SamplerDefinition("ancestral", GRIDS, "diffusers", ancestral),
    "ode-euler": SamplerDefinition("probability-flow-euler", ODE_GRIDS, "logsnr", ode(1)),
    "ode-heun": SamplerDefinition("probability-flow-heun", ODE_GRIDS, "logsnr", ode(2), lambda _: 2),
    "dpmpp-2m": SamplerDefinition("dpm-solver++(2m)", ODE_GRIDS, "logsnr", dpmpp(2, False), denoise_final=True),
    "dpmpp-3m": SamplerDefinition("dpm-solver++(3m)", ODE_GRIDS, "logsnr", dpmpp(3, False), denoise_final=True),
    "dpmpp-2m-sde": SamplerDefinition("sde-dpm-solver++(2m)", EDGE_GRIDS, "logsnr", dpmpp(2, True), denoise_final=True),
    "edm-heun": SamplerDefinition("edm-heun", ODE_GRIDS, "edm", edm_heun, lambda _: 2),
    "ipndm": SamplerDefinition("ipndm", ODE_GRIDS, "logsnr", ipndm),  # logsnr beat edm on the mixtures (docs/samplers.md)
    "unipc": SamplerDefinition("unipc", ODE_GRIDS, "logsnr", unipc, denoise_final=True),
    "inpaint": SamplerDefinition("inpaint-euler-maruyama", GRIDS, "diffusers", replacement("inpaint")),
    "colorize": SamplerDefinition("colorize-euler-maruyama", GRIDS, "diffusers", replacement("colorize")),
    "likelihood": SamplerDefinition("probability-flow-likelihood", EDGE_GRIDS, "logsnr", likelihood, lambda _: 4,
                                    task="likelihood"),
}
"""Sampler id (CLI ``--sampler``) -> its definition."""

SAMPLERS: dict[str, str] = {sampler: d.name for sampler, d in DEFINITIONS.items()}
"""Sampler id -> the name written to ``sampler.name`` (a view of :data:`DEFINITIONS`)."""


def steps_for_nfe(sampler: str, nfe: int, corrector_steps: int = 1) -> int:
    """The step count N that spends at most ``nfe`` model evaluations (rounded down); ValueError where one step
    costs more than ``nfe``."""
    per_step = DEFINITIONS[sampler].calls_per_step(corrector_steps)
    if nfe < per_step:
        raise ValueError(f"--nfe {nfe}: one {sampler} step costs {per_step} model evaluations; expected --nfe >= "
                         f"{per_step}")
    return nfe // per_step


def default_grid(sampler: str) -> str:
    return DEFINITIONS[sampler].default_grid


def check_grid(sampler: str, grid: str | None) -> str:
    """``grid`` (default: the sampler's), or ValueError naming what the sampler takes."""
    if sampler not in DEFINITIONS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(DEFINITIONS)}")
    grid = grid or DEFINITIONS[sampler].default_grid
    if grid not in DEFINITIONS[sampler].grids:
        raise ValueError(f"sampler {sampler!r} runs on the grids {', '.join(DEFINITIONS[sampler].grids)}, not {grid!r}")
    return grid


def check_options(sampler: str, steps: int, grid: str | None = None, *, snr: float | None = None,
                  corrector_steps: int | None = None, coupling: str | None = None, denoise_final: bool = False,
                  order: int | None = None, variant: str | None = None, divergence: str | None = None,
                  probes: int | None = None, probe: str | None = None, **built_options) -> str:
    """The grid (:func:`check_grid`) once ``steps`` and the options suit ``sampler``, else ValueError naming what
    does not: what :func:`build_sampler` checks first, and export checks before a tuned grid's cost. The options'
    values (and ``built_options``: edges) are checked as the steps are built."""
    grid = check_grid(sampler, grid)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if denoise_final and not DEFINITIONS[sampler].denoise_final:
        raise ValueError(f"denoise_final is an option of {', '.join(k for k, d in DEFINITIONS.items() if d.denoise_final)}")
    if denoise_final and steps < 2:
        raise ValueError("denoise_final needs steps >= 2 (the last step is the jump to t = 0)")
    if (snr is not None or corrector_steps is not None or coupling is not None) and sampler != "pc":
        raise ValueError("snr, corrector_steps and coupling are options of pc")
    if (order is not None or variant is not None) and sampler != "unipc":
        raise ValueError("order and variant are options of unipc")
    if (divergence is not None or probes is not None or probe is not None) and sampler != "likelihood":
        raise ValueError("divergence, probes and probe are options of likelihood")
    return grid


def build_sampler(sampler: str, model: ScoreModel, sde: VPSDE, steps: int, grid: str | None = None, *,
                  snr: float | None = None, corrector_steps: int | None = None, coupling: str | None = None,
                  denoise_final: bool = False, order: int | None = None, variant: str | None = None,
                  edges: torch.Tensor | None = None, divergence: str | None = None, probes: int | None = None,
                  probe: str | None = None) -> SamplerRecipe:
    """The recipe of ``sampler`` with ``steps`` steps on ``grid`` (default: the sampler's).

    ``snr``, ``corrector_steps`` and ``coupling`` configure the Langevin corrector of "pc" (score_sde defaults:
    snr 0.16, one corrector step, batch-averaged norms; here the norms' expectations by default, see
    :class:`LangevinCorrectorStep`; ``snr`` defaults by coupling, :data:`DEFAULT_SNR`; docs/samplers.md has the
    measurements behind both).
    ``denoise_final`` (the DPM-Solver++ samplers and UniPC): the last of the N steps goes from t = eps to t = 0, so
    the sample is the model's data prediction at eps (diffusers' ``final_sigmas_type="zero"``); the first N - 1
    steps span the grid from 1 to eps. ``order`` (2 or 3, default 3) and ``variant`` ("bh1" or "bh2", default
    "bh2") are UniPC's. ``edges``: the "tuned" grid's N + 1 times (``export/tuning.py``; export_bundle computes
    them). ``divergence`` ("exact" or "hutchinson", default), ``probes`` (default 1) and ``probe`` ("rademacher",
    default, or "gaussian") are the likelihood's (``export/likelihood.py``).
    """
    grid = check_options(sampler, steps, grid, snr=snr, corrector_steps=corrector_steps, coupling=coupling,
                         denoise_final=denoise_final, order=order, variant=variant, divergence=divergence,
                         probes=probes, probe=probe)
    definition, defaults = DEFINITIONS[sampler], Options()

    def given(value, default):  # None means the default; 0 or "" is a value, checked as the step is built
        return default if value is None else value

    common = dict(sampler=sampler, name=definition.name, grid=grid, steps=steps)
    return definition.build(common, model, sde, grid, steps,
                            Options(snr, given(corrector_steps, defaults.corrector_steps),
                                    given(coupling, defaults.coupling), denoise_final, given(order, defaults.order),
                                    given(variant, defaults.variant), edges, given(divergence, defaults.divergence),
                                    given(probes, defaults.probes), given(probe, defaults.probe)))


def edm_heun_schedule(sde: VPSDE, edges: torch.Tensor) -> dict[str, torch.Tensor]:
    """Coefficients of :class:`EDMHeunStep` on the edges t_0 = 1 > ... > t_N (float64 [N + 1]): with s = sigma/alpha,
    c_x = alpha_{i+1} / alpha_i and c_e = alpha_{i+1} (s_{i+1} - s_i), float64 [N] each, and t, t_next."""
    alpha = sde.mean_coeff(edges)
    s = sde.std(edges) / alpha
    return {"t": edges[:-1], "t_next": edges[1:], "c_x": alpha[1:] / alpha[:-1], "c_e": alpha[1:] * (s[1:] - s[:-1])}


def dpmpp_schedule(sde: VPSDE, edges: torch.Tensor, order: int = 2, stochastic: bool = False) -> dict[str, torch.Tensor]:
    """Coefficients of :class:`DPMSolverPPStep` on the edges t_0 = 1 > ... > t_N (float64 [N + 1]; t_N = eps, or 0 for
    a final jump to the data) -> float64 [N] arrays t, alpha, sigma, c_x, c_d, w_cur, w_prev (+ w_prev2 at order 3,
    + c_z when stochastic).

    With h_i = lambda_{i+1} - lambda_i, phi = -expm1(-h) and the step ratios r0 = h_{i-1}/h_i, r1 = h_{i-2}/h_i:

    - order 1 (the first step; the last when N < 15): D = x0;
    - order 2 (midpoint): D = x0 + (x0 - x0_prev) / (2 r0);
    - order 3 (Lu et al. 2022, eq. for DPM-Solver++(3M)): D = D0 + k1 D1 + k2 D2 with D0 = x0,
      D1_0 = (x0 - x0_prev)/r0, D1_1 = (x0_prev - x0_prev2)/r1, D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1),
      D2 = (D1_0 - D1_1)/(r0 + r1), k1 = (1 - phi/h)/phi, k2 = (1/2 - (h - phi)/h^2)/phi; the second step and,
      when N < 15, the one before last run at order 2.

    Deterministic: c_x = sigma_{i+1}/sigma_i, c_d = alpha_{i+1} phi. Stochastic (SDE-DPM-Solver++(2M)):
    c_x = sigma_{i+1}/sigma_i e^(-h), c_d = alpha_{i+1} (1 - e^(-2h)), c_z = sigma_{i+1} sqrt(1 - e^(-2h)).
    A step to t = 0 (sigma = 0, h = inf) is first order with c_x = 0, c_d = 1, c_z = 0: x_next = x0."""
    alpha, sigma, lam = sde.mean_coeff(edges), sde.std(edges), log_snr(sde, edges)
    h = lam[1:] - lam[:-1]  # > 0: lambda grows as t falls; inf for a step to t = 0
    n = h.numel()
    finite = torch.isfinite(h)
    step_order = torch.clamp(torch.arange(n) + 1, max=order)
    step_order = torch.where(finite, step_order, torch.ones_like(step_order))
    if n < LOWER_ORDER_FINAL_BELOW:
        step_order[-1] = 1
        if n >= 2:
            step_order[-2] = min(int(step_order[-2]), 2)
    w = torch.zeros(3, n, dtype=torch.float64)  # weights of x0, x0_prev, x0_prev2
    for i in range(n):
        k = int(step_order[i])
        if k == 1:
            w[:, i] = torch.tensor([1.0, 0.0, 0.0])
        elif k == 2:
            r0 = h[i - 1] / h[i]
            w[:, i] = torch.stack([1 + 0.5 / r0, -0.5 / r0, torch.zeros((), dtype=torch.float64)])
        else:
            hi = h[i]
            r0, r1 = h[i - 1] / hi, h[i - 2] / hi
            phi = -torch.expm1(-hi)
            k1, k2 = (1 - phi / hi) / phi, (0.5 - (hi - phi) / hi**2) / phi
            d10 = torch.stack([1 / r0, -1 / r0, torch.zeros((), dtype=torch.float64)])  # D1_0 in (x0, prev, prev2)
            d11 = torch.stack([torch.zeros((), dtype=torch.float64), 1 / r1, -1 / r1])
            d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
            d2 = (d10 - d11) / (r0 + r1)
            w[:, i] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) + k1 * d1 + k2 * d2
    exp_h = torch.exp(-h)
    if stochastic:
        c_x = torch.where(finite, sigma[1:] / sigma[:-1] * exp_h, torch.zeros_like(h))
        c_d = torch.where(finite, alpha[1:] * -torch.expm1(-2 * h), torch.ones_like(h))
    else:
        c_x = sigma[1:] / sigma[:-1]
        c_d = torch.where(finite, -alpha[1:] * torch.expm1(-h), torch.ones_like(h))
    out = {"t": edges[:-1], "alpha": alpha[:-1], "sigma": sigma[:-1], "c_x": c_x, "c_d": c_d,
           "w_cur": w[0], "w_prev": w[1]}
    if order == 3:
        out["w_prev2"] = w[2]
    if stochastic:
        out["c_z"] = torch.where(finite, sigma[1:] * torch.sqrt(-torch.expm1(-2 * h)), torch.zeros_like(h))
    return out


IPNDM_WEIGHTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))
"""Adams-Bashforth weights of orders 1 to 4 (current noise prediction first)."""


def ipndm_schedule(sde: VPSDE, edges: torch.Tensor) -> dict[str, torch.Tensor]:
    """Coefficients of :class:`IPNDMStep` on the edges t_0 = 1 > ... > t_N (float64 [N + 1]): t, c_x, c_e as for
    EDM's Heun (:func:`edm_heun_schedule`) and the weights w_cur, w_prev, w_prev2, w_prev3 of order min(i + 1, 4),
    float64 [N] each."""
    n = edges.numel() - 1
    w = torch.zeros(4, n, dtype=torch.float64)
    for i in range(n):
        weights = IPNDM_WEIGHTS[min(i, 3)]
        w[: len(weights), i] = torch.tensor(weights, dtype=torch.float64)
    heun = edm_heun_schedule(sde, edges)
    return {"t": heun["t"], "c_x": heun["c_x"], "c_e": heun["c_e"], "w_cur": w[0], "w_prev": w[1], "w_prev2": w[2],
            "w_prev3": w[3]}


def unipc_rhos(r: torch.Tensor, hh: torch.Tensor, b_h: torch.Tensor, order: int, predictor: bool) -> torch.Tensor:
    """UniPC's weights rho (Zhao et al. 2023, Algorithms 2 and 3 with B(h)): ``r`` the previous points' ratios
    r_k = (lambda_k - lambda_s) / h (float64 [order - 1]), hh = -h. The predictor solves the (order - 1)-square
    system (order 2: rho = 1/2), the corrector the order-square one with r = 1 appended (order 1: rho = 1/2)."""
    rks = torch.cat([r, torch.ones(1, dtype=torch.float64)])
    h_phi_k, factorial, rows, b = torch.expm1(hh) / hh - 1, 1.0, [], []
    for i in range(1, order + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = torch.stack(rows), torch.stack(b)
    if predictor:
        return torch.full((1,), 0.5, dtype=torch.float64) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
    return torch.full((1,), 0.5, dtype=torch.float64) if order == 1 else torch.linalg.solve(R, b)


def unipc_orders(n: int, order: int) -> list[int]:
    """The predictor's order at each of the n steps: warm-up min(i + 1, order), and lower at the end as diffusers'
    ``lower_order_final`` (min(order, n - i)): the last step is first order."""
    return [min(order, i + 1, n - i) for i in range(n)]


def unipc_schedule(sde: VPSDE, edges: torch.Tensor, order: int = 3, variant: str = "bh2") -> dict[str, torch.Tensor]:
    """Coefficients of :class:`UniPCStep` on the edges t_0 = 1 > ... > t_N (float64 [N + 1]; t_N = eps, or 0 for a
    final jump to the data), float64 [N] each. With h = lambda_{i+1} - lambda_i, hh = -h, B = hh (bh1) or
    e^hh - 1 (bh2) and rho from :func:`unipc_rhos`, the predictor from x_c at t_i with p = its order is

        x_next = sigma_{i+1}/sigma_i x_c - alpha_{i+1} (e^hh - 1) m_i - alpha_{i+1} B sum_k rho_k (m_{i-k} - m_i) / r_k

    and the corrector at step i (i >= 1) repeats the step from x_prev = x_c of step i - 1 at that step's order q,
    with m_i in the last place: x_c = (the same from t_{i-1}) - alpha_i B rho_q (m_i - m_{i-1}). A step to t = 0
    is the data prediction itself: x_next = m_i."""
    alpha, sigma, lam = sde.mean_coeff(edges), sde.std(edges), log_snr(sde, edges)
    n = edges.numel() - 1
    orders = unipc_orders(n, order)
    names = ["u", "v", "c_cur", "c_prev", "c_prev2", "c_prev3", "p_x", "p_cur", "p_prev", "p_prev2"]
    out = {k: torch.zeros(n, dtype=torch.float64) for k in names}

    def update(s: int, p: int, predictor: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step s -> s + 1 at order p: (weight of the start point, weights of m_s, m_{s-1}, ..., weight of m_{s+1})."""
        t = s + 1
        h = lam[t] - lam[s]
        if not torch.isfinite(h):  # to t = 0 (alpha 1, sigma 0): the data prediction
            return torch.zeros(()), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), torch.zeros(())
        hh = -h
        b_h = hh if variant == "bh1" else torch.expm1(hh)
        r = torch.stack([(lam[s - k] - lam[s]) / h for k in range(1, p)]) if p > 1 else torch.zeros(0, dtype=torch.float64)
        rho = unipc_rhos(r, hh, b_h, p, predictor) if p > 1 or not predictor else r
        w = torch.zeros(3, dtype=torch.float64)  # m_s, m_{s-1}, m_{s-2}
        w[0] = -alpha[t] * torch.expm1(hh)
        for k in range(1, p):
            w[k] -= alpha[t] * b_h * rho[k - 1] / r[k - 1]
            w[0] += alpha[t] * b_h * rho[k - 1] / r[k - 1]
        new = torch.zeros((), dtype=torch.float64)
        if not predictor:
            new = -alpha[t] * b_h * rho[-1]
            w[0] += alpha[t] * b_h * rho[-1]
        return sigma[t] / sigma[s], w, new

    for i in range(n):
        if i == 0:
            out["u"][i] = 1.0
        else:
            out["v"][i], w, out["c_cur"][i] = update(i - 1, orders[i - 1], predictor=False)
            out["c_prev"][i], out["c_prev2"][i], out["c_prev3"][i] = w
        out["p_x"][i], w, _ = update(i, orders[i], predictor=True)
        out["p_cur"][i], out["p_prev"][i], out["p_prev2"][i] = w
    if order == 2:
        del out["c_prev3"], out["p_prev2"]
    return {"t": edges[:-1], "alpha": alpha[:-1], "sigma": sigma[:-1], **out}

