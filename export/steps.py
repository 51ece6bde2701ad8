"""Sampler steps as traceable torch modules: everything a step needs comes in as an input (stateless).

Every step maps ``forward(*input_names) -> output_names`` with x and the other sample-shaped inputs float32
[B, *sample_shape] and per-step scalars float32 [B] (one value per sample: the host broadcasts the schedule).
Scalars the host can precompute (grid times, discrete betas, solver coefficients) are inputs taken from the
manifest's schedule, computed there in float64 and rounded once; the graphs hold only the model and the
update. Random numbers never live in a graph: noise is an input.

Notation: eps(x, t) is the network's noise prediction, score = -eps / std(t), alpha(t) = mean coefficient,
sigma(t) = std(t), beta(t) the linear VP beta.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from vpsde.models.base import ScoreModel
from vpsde.models.sde import VPSDE

COUPLINGS = ("expected", "batch", "per-sample")
"""Langevin corrector step-size rules (see :class:`LangevinCorrectorStep`); the first is the default."""


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector [B] to broadcast against ``like`` [B, ...]."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


class Step(nn.Module):
    """Base of the step modules: the score model and the SDE, and the score from the noise prediction."""

    kind: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...] = ("x_next", "x_mean")

    def __init__(self, model: ScoreModel, sde: VPSDE) -> None:
        super().__init__()
        self.model = model
        self.sde = sde

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad_x log p_t(x) = -eps(x, t) / std(t)."""
        return -self.model(x, t) / per_sample(self.sde.std(t), x)


class EulerMaruyamaStep(Step):
    """One Euler-Maruyama step of the reverse-time VP-SDE (diffusers ``step_pred``, score_sde
    ``EulerMaruyamaPredictor``).

        drift  = -1/2 beta(t) x - beta(t) score
        x_mean = x + drift dt
        x_next = x_mean + sqrt(beta(t)) sqrt(-dt) noise

    Inputs x, t, dt (< 0), sqrt_neg_dt, noise. sqrt_neg_dt = sqrt(-dt) comes from the schedule, computed in
    float64 from the exact step and rounded once: a float32 sqrt of the rounded dt differs in the last bit for
    N = 20, 50, 1000 (diffusers computes ``math.sqrt(-dt)`` in float64, too). The expression order is
    diffusers' (including beta written as sqrt(beta)^2), so with ``std_formula="diffusers"`` the result is
    bit-identical to ``ScoreSdeVpScheduler.step_pred`` in float32.
    """

    kind = "em"
    input_names = ("x", "t", "dt", "sqrt_neg_dt", "noise")

    def forward(self, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, sqrt_neg_dt: torch.Tensor,
                noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score = self.score(x, t)
        beta_t = per_sample(self.sde.beta(t), x)
        diffusion = torch.sqrt(beta_t)
        drift = -0.5 * beta_t * x - diffusion**2 * score
        x_mean = x + drift * per_sample(dt, x)
        x_next = x_mean + diffusion * per_sample(sqrt_neg_dt, x) * noise
        return x_next, x_mean


class DiscretePredictorStep(Step):
    """The predictors of score_sde that use the discrete DDPM betas of an N-step chain (``beta`` input: beta_i
    = linspace(beta_min/N, beta_max/N, N)[i], the step's index from t).

    ``rule="reverse-diffusion"`` (``ReverseDiffusionPredictor``, the discretised reverse SDE):
        x_mean = x - (sqrt(1 - beta) x - x) + beta score,       x_next = x_mean + sqrt(beta) noise
    ``rule="ancestral"`` (``AncestralSamplingPredictor``, DDPM ancestral sampling):
        x_mean = (x + beta score) / sqrt(1 - beta),              x_next = x_mean + sqrt(beta) noise
    """

    input_names = ("x", "t", "beta", "noise")

    def __init__(self, model: ScoreModel, sde: VPSDE, rule: Literal["reverse-diffusion", "ancestral"]) -> None:
        super().__init__(model, sde)
        if rule not in ("reverse-diffusion", "ancestral"):
            raise ValueError(f"unknown discrete predictor {rule!r}")
        self.rule = rule
        self.kind = rule.replace("-", "_")

    def forward(self, x: torch.Tensor, t: torch.Tensor, beta: torch.Tensor,
                noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score = self.score(x, t)
        beta = per_sample(beta, x)
        if self.rule == "reverse-diffusion":
            f = torch.sqrt(1.0 - beta) * x - x
            x_mean = x - (f - beta * score)
        else:
            x_mean = (x + beta * score) / torch.sqrt(1.0 - beta)
        return x_mean + torch.sqrt(beta) * noise, x_mean


class LangevinCorrectorStep(Step):
    """One Langevin MCMC correction at fixed t (score_sde ``LangevinCorrector`` for the VP-SDE):

        step   = 2 alpha_i (snr |noise| / |score|)^2,   alpha_i = 1 - beta_i (``beta`` input)
        x_mean = x + step score,                         x_next = x_mean + sqrt(2 step) noise

    |.| is the L2 norm of one sample, and ``coupling`` says which norms:

    - ``"expected"``: their expectations, |noise|^2 = d and |score|^2 = d / sigma(t)^2 (|eps|^2 = d), so
      step = 2 alpha_i (snr sigma(t))^2: no reduction over any axis, so a sample depends on nothing but its own
      inputs, and the step cannot blow up where one sample's score vanishes;
    - ``"batch"``: averaged over the batch, exactly as score_sde does (a sample then depends on its batch-mates);
    - ``"per-sample"``: each sample's own norms (unstable in low dimensions: near a mode |score| -> 0).
    """

    kind = "langevin"
    input_names = ("x", "t", "beta", "noise")

    def __init__(self, model: ScoreModel, sde: VPSDE, snr: float,
                 coupling: Literal["expected", "batch", "per-sample"]) -> None:
        super().__init__(model, sde)
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {', '.join(COUPLINGS)}, got {coupling!r}")
        if not snr > 0:
            raise ValueError(f"snr must be > 0, got {snr}")
        self.snr, self.coupling = float(snr), coupling

    def forward(self, x: torch.Tensor, t: torch.Tensor, beta: torch.Tensor,
                noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad = self.score(x, t)
        if self.coupling == "expected":
            step_size = (self.snr * self.sde.std(t)) ** 2 * 2.0 * (1.0 - beta)
        else:
            grad_norm = torch.linalg.vector_norm(grad.flatten(1), dim=-1)
            noise_norm = torch.linalg.vector_norm(noise.flatten(1), dim=-1)
            if self.coupling == "batch":
                grad_norm, noise_norm = grad_norm.mean(), noise_norm.mean()
            step_size = (self.snr * noise_norm / grad_norm) ** 2 * 2.0 * (1.0 - beta)
        step_size = per_sample(step_size, x)
        x_mean = x + step_size * grad
        return x_mean + torch.sqrt(step_size * 2.0) * noise, x_mean


class ProbabilityFlowStep(Step):
    """One step of the probability-flow ODE  dx/dt = -1/2 beta(t) (x + score(x, t)), deterministic.

    ``order=1`` (Euler):  x_next = x + dt v(x, t)                        inputs x, t, dt
    ``order=2`` (Heun):   x_e = x + dt v(x, t);
                          x_next = x + dt/2 (v(x, t) + v(x_e, t_next))     inputs x, t, dt, t_next (2 model calls)
    """

    output_names = ("x_next",)

    def __init__(self, model: ScoreModel, sde: VPSDE, order: int) -> None:
        super().__init__(model, sde)
        if order not in (1, 2):
            raise ValueError(f"order must be 1 (Euler) or 2 (Heun), got {order}")
        self.order = order
        self.kind = "ode_euler" if order == 1 else "ode_heun"
        self.input_names = ("x", "t", "dt") if order == 1 else ("x", "t", "dt", "t_next")

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * per_sample(self.sde.beta(t), x) * (x + self.score(x, t))

    def forward(self, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor,
                t_next: torch.Tensor | None = None) -> torch.Tensor:
        dt = per_sample(dt, x)
        d = self.velocity(x, t)
        if self.order == 1:
            return x + dt * d
        d_next = self.velocity(x + dt * d, t_next)
        return x + dt * (0.5 * (d + d_next))


class DPMSolverPPStep(Step):
    """One step of multistep DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095), data prediction, from t_i to t_{i+1}:

        x0     = (x - sigma_i eps(x, t_i)) / alpha_i
        D      = w_cur x0 + w_prev x0_prev [+ w_prev2 x0_prev2]
        x_next = c_x x + c_d D [+ c_z noise]

    Every coefficient is a schedule input, computed on the host in float64 (``samplers.dpmpp_schedule``), so one
    module covers the family: ``order=2`` is DPM-Solver++(2M) (kind ``dpmpp_2m``); ``order=3`` is (3M) (kind
    ``dpmpp_3m``: a second history ``x0_prev2``, passed on as output ``x0_prev_out``); ``stochastic=True`` is
    SDE-DPM-Solver++(2M) (kind ``dpmpp_2m_sde``: host noise, ``c_z`` = sigma_{i+1} sqrt(1 - e^(-2 h_i))). The
    first steps (and the last ones when N < 15) run at lower order by their weights alone. The history values are
    state the host carries: ``x0_prev`` <- ``x0``, ``x0_prev2`` <- ``x0_prev_out``.
    """

    def __init__(self, model: ScoreModel, sde: VPSDE, order: int = 2, stochastic: bool = False) -> None:
        super().__init__(model, sde)
        if order not in (2, 3) or (stochastic and order != 2):
            raise ValueError(f"DPM-Solver++ steps: order 2 or 3, stochastic only at order 2; got {order}, {stochastic}")
        self.order, self.stochastic = order, stochastic
        self.kind = {(2, False): "dpmpp_2m", (3, False): "dpmpp_3m", (2, True): "dpmpp_2m_sde"}[(order, stochastic)]
        names = ["x", "t", "alpha", "sigma", "c_x", "c_d", "w_cur", "w_prev"]
        names += ["w_prev2"] if order == 3 else []
        names += ["c_z"] if stochastic else []
        names += ["x0_prev"] + (["x0_prev2"] if order == 3 else []) + (["noise"] if stochastic else [])
        self.input_names = tuple(names)
        self.output_names = ("x_next", "x0", "x0_prev_out") if order == 3 else ("x_next", "x0")

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        v = dict(zip(self.input_names, inputs))
        x = v["x"]
        c = {k: per_sample(v[k], x) for k in self.input_names if k not in ("x", "t", "x0_prev", "x0_prev2", "noise")}
        x0 = (x - c["sigma"] * self.model(x, v["t"])) / c["alpha"]
        d = c["w_cur"] * x0 + c["w_prev"] * v["x0_prev"]
        if self.order == 3:
            d = d + c["w_prev2"] * v["x0_prev2"]
        x_next = c["c_x"] * x + c["c_d"] * d
        if self.stochastic:
            x_next = x_next + c["c_z"] * v["noise"]
        return (x_next, x0, v["x0_prev"] * 1.0) if self.order == 3 else (x_next, x0)


class IPNDMStep(Step):
    """One step of iPNDM (Zhang & Chen 2023, DEIS, arXiv:2204.13902): Adams-Bashforth on the noise prediction in the
    variables x~ = x / alpha and s = sigma / alpha, where the probability-flow ODE is dx~/ds = eps:

        e      = eps(x, t_i)
        x_next = c_x x + c_e (w_cur e + w_prev e_prev + w_prev2 e_prev2 + w_prev3 e_prev3)

    c_x = alpha_{i+1} / alpha_i and c_e = alpha_{i+1} (s_{i+1} - s_i) (the exact transfer, as DDIM), and the
    fixed Adams-Bashforth weights of order min(i + 1, 4) (``samplers.ipndm_schedule``). State the host carries:
    ``e_prev`` <- ``e``, ``e_prev2`` <- ``e_prev_out``, ``e_prev3`` <- ``e_prev2_out``.
    """

    kind = "ipndm"
    input_names = ("x", "t", "c_x", "c_e", "w_cur", "w_prev", "w_prev2", "w_prev3", "e_prev", "e_prev2", "e_prev3")
    output_names = ("x_next", "e", "e_prev_out", "e_prev2_out")

    def forward(self, x, t, c_x, c_e, w_cur, w_prev, w_prev2, w_prev3, e_prev, e_prev2, e_prev3):
        w = [per_sample(v, x) for v in (w_cur, w_prev, w_prev2, w_prev3)]
        e = self.model(x, t)
        d = w[0] * e + w[1] * e_prev + w[2] * e_prev2 + w[3] * e_prev3
        return per_sample(c_x, x) * x + per_sample(c_e, x) * d, e, e_prev * 1.0, e_prev2 * 1.0


class UniPCStep(Step):
    """One step of multistep UniPC (Zhao et al. 2023, arXiv:2302.04867), data prediction: the corrector UniC of the
    step that led to x_i needs the model at x_i, which is this step's call, so it runs here, before the predictor
    UniP, and a step costs one model call:

        x0     = (x - sigma_i eps(x, t_i)) / alpha_i                         (at the uncorrected x_i)
        x_c    = u x + v x_prev + c_cur x0 + c_prev x0_prev + c_prev2 x0_prev2 [+ c_prev3 x0_prev3]     (UniC)
        x_next = p_x x_c + p_cur x0 + p_prev x0_prev [+ p_prev2 x0_prev2]                              (UniP)

    Every coefficient comes from the schedule (``samplers.unipc_schedule``, float64 on the host): the first step
    has u = 1 and no correction. ``order`` 2 or 3. State the host carries: ``x_prev`` <- ``x_c``, ``x0_prev`` <- ``x0``,
    ``x0_prev2`` <- ``x0_prev_out`` (and at order 3 ``x0_prev3`` <- ``x0_prev2_out``).
    """

    kind = "unipc"

    def __init__(self, model: ScoreModel, sde: VPSDE, order: int = 3) -> None:
        super().__init__(model, sde)
        if order not in (2, 3):
            raise ValueError(f"UniPC steps: order 2 or 3, got {order}")
        self.order = order
        history = ["x0_prev", "x0_prev2"] + (["x0_prev3"] if order == 3 else [])
        self.corrector = ["u", "v", "c_cur", "c_prev", "c_prev2"] + (["c_prev3"] if order == 3 else [])
        self.predictor = ["p_x", "p_cur", "p_prev"] + (["p_prev2"] if order == 3 else [])
        self.input_names = ("x", "t", "alpha", "sigma", *self.corrector, *self.predictor, "x_prev", *history)
        self.output_names = ("x_next", "x_c", "x0", "x0_prev_out") + (("x0_prev2_out",) if order == 3 else ())

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        v = dict(zip(self.input_names, inputs))
        x = v["x"]
        c = {k: per_sample(v[k], x) for k in ("alpha", "sigma", *self.corrector, *self.predictor)}
        x0 = (x - c["sigma"] * self.model(x, v["t"])) / c["alpha"]
        history = [x0, v["x0_prev"], v["x0_prev2"]] + ([v["x0_prev3"]] if self.order == 3 else [])
        x_c = c["u"] * x + c["v"] * v["x_prev"]
        for name, value in zip(self.corrector[2:], history):
            x_c = x_c + c[name] * value
        x_next = c["p_x"] * x_c
        for name, value in zip(self.predictor[1:], history):
            x_next = x_next + c[name] * value
        return (x_next, x_c, x0, v["x0_prev"] * 1.0) + ((v["x0_prev2"] * 1.0,) if self.order == 3 else ())


class EDMHeunStep(Step):
    """One step of Karras et al.'s (EDM, 2022) deterministic Heun sampler, Algorithm 1 with s(t) = 1, on the
    VP model: in the variables x~ = x / alpha and s = sigma / alpha the probability-flow ODE is dx~/ds = eps, so

        x_e    = c_x x + c_e eps(x, t_i)                              (Euler: DDIM)
        x_next = c_x x + c_e (eps(x, t_i) + eps(x_e, t_{i+1})) / 2     (Heun's correction)

    with c_x = alpha_{i+1} / alpha_i and c_e = alpha_{i+1} (s_{i+1} - s_i) from the schedule (float64 on the
    host). 2 NFE per step; its grid is EDM's rho = 7 by default.
    """

    kind = "edm_heun"
    input_names = ("x", "t", "t_next", "c_x", "c_e")
    output_names = ("x_next",)

    def forward(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, c_x: torch.Tensor,
                c_e: torch.Tensor) -> torch.Tensor:
        c_x, c_e = per_sample(c_x, x), per_sample(c_e, x)
        e = self.model(x, t)
        x_euler = c_x * x + c_e * e
        return c_x * x + c_e * (0.5 * (e + self.model(x_euler, t_next)))


def gray_basis(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """score_sde's colorization basis: an orthogonal 3 x 3 matrix M whose first column is (1, 1, 1) / sqrt(3)
    (the gray level, scaled) and whose other columns, (-2, 1, 1) / sqrt(6) and (0, 1, -1) / sqrt(2), span the colors.
    Decoupled channels: y_j = sum_i x_i M_ij; back: x_i = sum_j y_j M_ij."""
    m = torch.tensor([[1 / 3**0.5, -2 / 6**0.5, 0.0], [1 / 3**0.5, 1 / 6**0.5, 1 / 2**0.5],
                      [1 / 3**0.5, 1 / 6**0.5, -1 / 2**0.5]], dtype=torch.float64)
    return m.to(dtype)


class ReplacementStep(nn.Module):
    """Wraps a noisy step with score_sde's controllable generation (``controllable_generation.py``): after the
    step, re-impose what is known, noised to the step's t with host noise.

    ``mode="inpaint"`` (``get_pc_inpainter``): inputs ``known`` [B, *sample] (data, model value range), ``mask``
    [B, *sample] (1 = known), ``known_noise`` [B, *sample]:

        x_next = x_next (1 - mask) + (alpha(t) known + std(t) known_noise) mask
        x_mean = x_mean (1 - mask) + known mask

    ``mode="colorize"`` (``get_pc_colorizer``; 3 channels on axis 1): inputs ``known`` [B, 3, ...] (an image whose
    channel mean is the gray level to keep: a gray image repeated, or a color one) and ``known_noise``. In the
    decoupled channels y = x M (:func:`gray_basis`), channel 0 is sqrt(3) x gray; it is replaced as above (mask =
    channel 0), with channel 0 of ``known_noise``, and the result mapped back by M^T.

    score_sde builds x_mean from the noisy x in the unknown region; this uses the step's x_mean there, so the
    final sample carries no last-step noise (as every other sampler here). The known part of x_mean (the final
    sample) is the known data itself: inpainting returns the known pixels exactly where mask is 1;
    colorization returns the given gray level (channel mean) to float32 rounding of the basis change (~1e-7).
    """

    def __init__(self, step: Step, mode: Literal["inpaint", "colorize"] = "inpaint") -> None:
        super().__init__()
        if step.output_names != ("x_next", "x_mean") or "t" not in step.input_names:
            raise ValueError(f"inpainting wraps a noisy step with outputs (x_next, x_mean), not {step.kind!r}")
        if mode not in ("inpaint", "colorize"):
            raise ValueError(f"mode must be inpaint or colorize, got {mode!r}")
        self.step, self.mode = step, mode
        self.sde = step.sde
        self.kind = f"{mode}_{step.kind}"
        self.input_names = (*step.input_names, "known", *(("mask",) if mode == "inpaint" else ()), "known_noise")
        self.output_names = step.output_names
        self._t = step.input_names.index("t")
        if mode == "colorize":
            self.register_buffer("basis", gray_basis())
            self.register_buffer("gray_mask", torch.tensor([1.0, 0.0, 0.0]))

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.step.input_names)
        step_inputs, cond = inputs[:n], dict(zip(self.input_names[n:], inputs[n:]))
        x_next, x_mean = self.step(*step_inputs)
        t = step_inputs[self._t]
        known, known_noise = cond["known"], cond["known_noise"]
        if self.mode == "colorize":
            x_next, x_mean, known = self._decouple(x_next), self._decouple(x_mean), self._decouple(known)
            mask = self.gray_mask.view(1, 3, *([1] * (known.dim() - 2)))  # channel 0 of y: the gray level
        else:
            mask = cond["mask"]
        known_noisy = per_sample(self.sde.mean_coeff(t), known) * known + per_sample(self.sde.std(t), known) * known_noise
        x_next = x_next * (1.0 - mask) + known_noisy * mask
        x_mean = x_mean * (1.0 - mask) + known * mask
        if self.mode == "colorize":
            x_next, x_mean = self._couple(x_next), self._couple(x_mean)
        return x_next, x_mean

    def _decouple(self, x: torch.Tensor) -> torch.Tensor:
        """y_j = sum_i x_i M_ij over channel axis 1."""
        return (x.movedim(1, -1) @ self.basis).movedim(-1, 1)

    def _couple(self, y: torch.Tensor) -> torch.Tensor:
        return (y.movedim(1, -1) @ self.basis.T).movedim(-1, 1)
