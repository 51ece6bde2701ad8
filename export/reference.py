"""Eager reference samplers in plain torch, written from the paper and score_sde formulas.

They share nothing with the exported step modules, the schedule code or ``models/sde.py``: the SDE
coefficients, time grids (the log-SNR grid by bisection, not the closed form), discrete betas and solver
coefficients are recomputed here, so parity tests of the bundles against these functions check the export
path end to end. They run in the dtype of ``x`` (float64 for an exact reference).

A sampler is a short function over a noise-prediction callable and a schedule (k-diffusion style):

    eps_fn(x [B, ...], t [B]) -> eps [B, ...]
    noise(call) -> standard normal [B, ...] for noise call ``call`` (the prior is call 0, then one call per
        noise draw in order; the bundles number their calls the same way)
    callback(record) per graph-equivalent call, record = {"kind", "step", "inputs": {...}, "outputs": {...}}
        with tensors named as the exported graph's inputs and outputs (for per-call parity tests)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]
Callback = Callable[[dict], None]


@dataclass(frozen=True)
class VP:
    """The VP-SDE of the paper: beta(t) = b0 + t (b1 - b0); x_t = alpha(t) x_0 + sigma(t) z."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    eps: float = 1e-3

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha(t) = -int_0^t beta(s)/2 ds."""
        return -0.5 * self.beta_min * t - 0.25 * (self.beta_max - self.beta_min) * t * t

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def lam(self, t: torch.Tensor) -> torch.Tensor:
        """lambda(t) = log(alpha / sigma)."""
        return self.log_alpha(t) - torch.log(self.sigma(t))


def times(vp: VP, steps: int, grid: str) -> torch.Tensor:
    """N + 1 float64 times from 1 down to eps: "uniform" in t, "logsnr" (equal steps in lambda) or "edm" (equal
    steps in s^(1/7), s = sigma/alpha = e^-lambda; Karras et al. 2022, eq. 5), the last two found by bisection of
    the monotone lambda(t)."""
    if grid == "uniform":
        return torch.linspace(1.0, vp.eps, steps + 1, dtype=torch.float64)
    if grid not in ("logsnr", "edm"):
        raise ValueError(f"grid {grid!r}: expected uniform, logsnr or edm")
    one = torch.tensor([1.0, vp.eps], dtype=torch.float64)
    if grid == "logsnr":
        target = torch.linspace(float(vp.lam(one[:1])), float(vp.lam(one[1:])), steps + 1, dtype=torch.float64)
    else:
        s_max, s_min = (vp.sigma(one) / vp.alpha(one)) ** (1 / 7)
        i = torch.arange(steps + 1, dtype=torch.float64)
        target = -7 * torch.log(s_max + i / steps * (s_min - s_max))
    lo, hi = torch.zeros_like(target), torch.ones_like(target)
    for _ in range(80):  # lambda decreases in t
        mid = 0.5 * (lo + hi)
        above = vp.lam(mid) > target
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    out = 0.5 * (lo + hi)
    out[0], out[-1] = 1.0, vp.eps
    return out


def _vec(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), dtype=x.dtype)


def _b(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (x.dim() - 1))


def _score(eps_fn: EpsFn, vp: VP, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return -eps_fn(x, t) / _b(vp.sigma(t), x)


def _emit(callback: Callback | None, kind: str, step: int, inputs: dict, outputs: dict) -> None:
    if callback is not None:
        callback({"kind": kind, "step": step, "inputs": inputs, "outputs": outputs})


# -- reverse SDE: Euler-Maruyama ------------------------------------------------------------------------------
def _em_grid(vp: VP, steps: int, grid: str) -> list[tuple[float, float]]:
    """(t_i, dt_i): score_sde/diffusers' linspace(1, eps, N) with dt = -1/N, or an edge grid."""
    if grid == "diffusers":
        return [(float(t), -1.0 / steps) for t in torch.linspace(1.0, vp.eps, steps, dtype=torch.float64)]
    e = times(vp, steps, grid)
    return [(float(e[i]), float(e[i + 1] - e[i])) for i in range(steps)]


def sample_em(eps_fn: EpsFn, x: torch.Tensor, noise: NoiseFn, vp: VP = VP(), steps: int = 1000,
              grid: str = "diffusers", callback: Callback | None = None,
              inpaint: tuple[torch.Tensor, torch.Tensor] | None = None,
              colorize: torch.Tensor | None = None) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE dx = [-1/2 beta x - beta score] dt + sqrt(beta) dw-bar; returns the
    last x_mean. ``inpaint=(known, mask)``: after every step, known pixels are replaced by the known data
    noised to the step's t (score_sde ``get_pc_inpainter``), with one more noise call per step; the returned
    x_mean holds the known data itself where mask is 1. ``colorize=known`` (score_sde ``get_pc_colorizer``):
    the gray level g = u . x (u = (1, 1, 1) / sqrt(3) over channel axis 1) is projected onto u . known noised to
    the step's t (noise: channel 0 of one more noise call): x <- x + u (target - u . x)."""
    call = 1
    x_mean = x
    for i, (t, dt) in enumerate(_em_grid(vp, steps, grid)):
        tv = _vec(t, x)
        z = noise(call)
        call += 1
        beta = _b(vp.beta(tv), x)
        x_mean = x + (-0.5 * beta * x - beta * _score(eps_fn, vp, x, tv)) * dt
        x_next = x_mean + torch.sqrt(beta) * math.sqrt(-dt) * z
        inputs = {"x": x, "noise": z}
        if inpaint is not None:
            known, mask = inpaint
            zk = noise(call)
            call += 1
            known_mean = _b(vp.alpha(tv), x) * known
            x_next = x_next * (1 - mask) + (known_mean + _b(vp.sigma(tv), x) * zk) * mask
            x_mean = x_mean * (1 - mask) + known * mask  # the final sample returns the known data exactly
            inputs.update(known=known, mask=mask, known_noise=zk)
        if colorize is not None:
            zk = noise(call)
            call += 1
            shape = [1, 3] + [1] * (x.dim() - 2)
            u = torch.full(shape, 3 ** -0.5, dtype=x.dtype)
            gray = lambda v: (v * u).sum(1, keepdim=True)  # noqa: E731
            target = _b(vp.alpha(tv), x) * gray(colorize) + _b(vp.sigma(tv), x) * zk[:, :1]
            x_next = x_next + u * (target - gray(x_next))
            x_mean = x_mean + u * (gray(colorize) - gray(x_mean))
            inputs.update(known=colorize, known_noise=zk)
        kind = "inpaint_em" if inpaint is not None else "colorize_em" if colorize is not None else "em"
        _emit(callback, kind, i, inputs, {"x_next": x_next, "x_mean": x_mean})
        x = x_next
    return x_mean


# -- score_sde's discrete predictors and the Langevin corrector -------------------------------------------------
def discrete_schedule(vp: VP, steps: int, grid: str) -> list[tuple[float, float]]:
    """(t_i, beta_i). "diffusers" (score_sde's grid): t = linspace(1, eps, N) and beta_i =
    linspace(b0/N, b1/N, N)[(t_i (N - 1)).long()], in score_sde's float32; edge grids: the DDPM chain
    respaced, beta_i = 1 - alpha(t_i)^2 / alpha(t_{i+1})^2."""
    if grid == "diffusers":
        ts = torch.linspace(1.0, vp.eps, steps)  # float32, as score_sde
        betas = torch.linspace(vp.beta_min / steps, vp.beta_max / steps, steps)
        idx = (ts * (steps - 1) / 1.0).long()
        return [(float(t), float(betas[j])) for t, j in zip(ts, idx)]
    e = times(vp, steps, grid).float().double()
    a2 = vp.alpha(e) ** 2
    return [(float(e[i]), float(1.0 - a2[i] / a2[i + 1])) for i in range(steps)]


def langevin(eps_fn: EpsFn, vp: VP, x: torch.Tensor, t: torch.Tensor, beta: float, z: torch.Tensor, snr: float,
             coupling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """score_sde ``LangevinCorrector.update_fn`` for VP (alpha = 1 - beta); norms averaged over the batch
    ("batch"), per sample ("per-sample"), or replaced by their expectations ("expected": E|z|^2 = d,
    E|score|^2 = d / sigma(t)^2, so the step is 2 alpha (snr sigma(t))^2)."""
    grad = _score(eps_fn, vp, x, t)
    if coupling == "expected":
        step_size = (snr * vp.sigma(t)) ** 2 * 2 * (1.0 - beta) * torch.ones(x.shape[0], dtype=x.dtype)
    else:
        grad_norm = torch.norm(grad.reshape(grad.shape[0], -1), dim=-1)
        noise_norm = torch.norm(z.reshape(z.shape[0], -1), dim=-1)
        if coupling == "batch":
            grad_norm, noise_norm = grad_norm.mean(), noise_norm.mean()
        step_size = (snr * noise_norm / grad_norm) ** 2 * 2 * (1.0 - beta) * torch.ones(x.shape[0], dtype=x.dtype)
    x_mean = x + _b(step_size, x) * grad
    return x_mean + _b(torch.sqrt(step_size * 2), x) * z, x_mean


def reverse_diffusion(eps_fn: EpsFn, vp: VP, x: torch.Tensor, t: torch.Tensor, beta: float,
                      z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """score_sde ``ReverseDiffusionPredictor`` with the VP discretisation f = sqrt(1 - beta) x - x, G = sqrt(beta)."""
    f = math.sqrt(1.0 - beta) * x - x
    x_mean = x - (f - beta * _score(eps_fn, vp, x, t))
    return x_mean + math.sqrt(beta) * z, x_mean


def ancestral(eps_fn: EpsFn, vp: VP, x: torch.Tensor, t: torch.Tensor, beta: float,
              z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """score_sde ``AncestralSamplingPredictor.vpsde_update_fn`` (DDPM ancestral step)."""
    x_mean = (x + beta * _score(eps_fn, vp, x, t)) / math.sqrt(1.0 - beta)
    return x_mean + math.sqrt(beta) * z, x_mean


def sample_pc(eps_fn: EpsFn, x: torch.Tensor, noise: NoiseFn, vp: VP = VP(), steps: int = 1000,
              grid: str = "diffusers", snr: float = 0.16, corrector_steps: int = 1, coupling: str = "batch",
              callback: Callback | None = None) -> torch.Tensor:
    """score_sde ``pc_sampler``: per step, ``corrector_steps`` Langevin corrections then one reverse-diffusion
    prediction; returns the last x_mean (``noise_removal``)."""
    call, x_mean = 1, x
    for i, (t, beta) in enumerate(discrete_schedule(vp, steps, grid)):
        tv = _vec(t, x)
        for _ in range(corrector_steps):
            z = noise(call)
            call += 1
            x_next, x_mean = langevin(eps_fn, vp, x, tv, beta, z, snr, coupling)
            _emit(callback, "langevin", i, {"x": x, "noise": z}, {"x_next": x_next, "x_mean": x_mean})
            x = x_next
        z = noise(call)
        call += 1
        x_next, x_mean = reverse_diffusion(eps_fn, vp, x, tv, beta, z)
        _emit(callback, "reverse_diffusion", i, {"x": x, "noise": z}, {"x_next": x_next, "x_mean": x_mean})
        x = x_next
    return x_mean


def sample_ancestral(eps_fn: EpsFn, x: torch.Tensor, noise: NoiseFn, vp: VP = VP(), steps: int = 1000,
                     grid: str = "diffusers", callback: Callback | None = None) -> torch.Tensor:
    """DDPM ancestral sampling (score_sde's predictor, no corrector); returns the last x_mean."""
    x_mean = x
    for i, (t, beta) in enumerate(discrete_schedule(vp, steps, grid)):
        z = noise(i + 1)
        x_next, x_mean = ancestral(eps_fn, vp, x, _vec(t, x), beta, z)
        _emit(callback, "ancestral", i, {"x": x, "noise": z}, {"x_next": x_next, "x_mean": x_mean})
        x = x_next
    return x_mean


# -- probability-flow ODE ----------------------------------------------------------------------------------------
def sample_ode(eps_fn: EpsFn, x: torch.Tensor, vp: VP = VP(), steps: int = 50, grid: str = "logsnr",
               order: int = 2, callback: Callback | None = None) -> torch.Tensor:
    """Euler (order 1) or Heun (order 2, EDM Alg. 1 without churn) on dx/dt = -1/2 beta (x + score)."""
    def v(x: torch.Tensor, t: float) -> torch.Tensor:
        tv = _vec(t, x)
        return -0.5 * _b(vp.beta(tv), x) * (x + _score(eps_fn, vp, x, tv))

    e = times(vp, steps, grid)
    for i in range(steps):
        t, t_next = float(e[i]), float(e[i + 1])
        d = v(x, t)
        x_next = x + (t_next - t) * d
        if order == 2:
            x_next = x + (t_next - t) * 0.5 * (d + v(x_next, t_next))
        _emit(callback, "ode_euler" if order == 1 else "ode_heun", i, {"x": x}, {"x_next": x_next})
        x = x_next
    return x


# -- DPM-Solver++(2M) ---------------------------------------------------------------------------------------------
def sample_dpmpp_2m(eps_fn: EpsFn, x: torch.Tensor, vp: VP = VP(), steps: int = 20, grid: str = "logsnr",
                    lower_order_final: bool = True, callback: Callback | None = None,
                    denoise_final: bool = False) -> torch.Tensor:
    """Multistep DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095) Algorithm 2, data prediction
    x0 = (x - sigma eps) / alpha, in log-SNR time; first order at the first step (and at the last when N < 15
    and ``lower_order_final``). ``denoise_final``: N - 1 steps from 1 to eps, then the sample is the data
    prediction x0 at eps (the limit of a step to t = 0)."""
    e = times(vp, steps - int(denoise_final), grid)
    x0_prev, h_prev = torch.zeros_like(x), None
    for i in range(steps):
        s = e[i]
        x0 = (x - vp.sigma(s) * eps_fn(x, _vec(s, x))) / vp.alpha(s)
        if denoise_final and i == steps - 1:
            _emit(callback, "dpmpp_2m", i, {"x": x, "x0_prev": x0_prev}, {"x_next": x0, "x0": x0})
            return x0
        t = e[i + 1]
        h = float(vp.lam(t) - vp.lam(s))
        if h_prev is None or (lower_order_final and steps < 15 and i == steps - 1):
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x_next = vp.sigma(t) / vp.sigma(s) * x - vp.alpha(t) * math.expm1(-h) * d
        _emit(callback, "dpmpp_2m", i, {"x": x, "x0_prev": x0_prev}, {"x_next": x_next, "x0": x0})
        x, x0_prev, h_prev = x_next, x0, h
    return x


# -- DPM-Solver++(3M) and SDE-DPM-Solver++(2M) ---------------------------------------------------------------------
def sample_dpmpp_3m(eps_fn: EpsFn, x: torch.Tensor, vp: VP = VP(), steps: int = 20, grid: str = "logsnr",
                    lower_order_final: bool = True, callback: Callback | None = None,
                    denoise_final: bool = False) -> torch.Tensor:
    """Multistep DPM-Solver++(3M) (Lu et al. 2022, arXiv:2211.01095, the third-order multistep update, as in
    their reference code): with D0 = x0, D1_0 = (x0 - x0') / r0, D1_1 = (x0' - x0'') / r1,
    D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1),

        x_t = sigma_t / sigma_s x - alpha_t (e^-h - 1) D0 + alpha_t ((e^-h - 1) / h + 1) D1
              - alpha_t ((e^-h - 1 + h) / h^2 - 1/2) D2.

    Order 1 at the first step, 2 (midpoint) at the second; with N < 15 and ``lower_order_final``, order 1 at the
    last step and at most 2 at the one before."""
    e = times(vp, steps - int(denoise_final), grid)
    hist: list[tuple[torch.Tensor, float]] = []  # (x0, h of the step that followed it), newest last
    prev = {"x0_prev": torch.zeros_like(x), "x0_prev2": torch.zeros_like(x)}
    for i in range(steps):
        s = e[i]
        x0 = (x - vp.sigma(s) * eps_fn(x, _vec(s, x))) / vp.alpha(s)
        if denoise_final and i == steps - 1:
            _emit(callback, "dpmpp_3m", i, {"x": x, **prev}, {"x_next": x0, "x0": x0, "x0_prev_out": prev["x0_prev"]})
            return x0
        t = e[i + 1]
        h = float(vp.lam(t) - vp.lam(s))
        order = min(i + 1, 3)
        if lower_order_final and steps < 15:
            order = 1 if i == steps - 1 else min(order, 2) if i == steps - 2 else order
        em1 = math.expm1(-h)
        if order == 1:
            x_next = vp.sigma(t) / vp.sigma(s) * x - vp.alpha(t) * em1 * x0
        elif order == 2:
            r0 = hist[-1][1] / h
            d1 = (x0 - hist[-1][0]) / r0
            x_next = vp.sigma(t) / vp.sigma(s) * x - vp.alpha(t) * em1 * (x0 + 0.5 * d1)
        else:
            r0, r1 = hist[-1][1] / h, hist[-2][1] / h
            d1_0, d1_1 = (x0 - hist[-1][0]) / r0, (hist[-1][0] - hist[-2][0]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x_next = (vp.sigma(t) / vp.sigma(s) * x - vp.alpha(t) * em1 * x0 + vp.alpha(t) * (em1 / h + 1) * d1
                      - vp.alpha(t) * ((em1 + h) / h**2 - 0.5) * d2)
        _emit(callback, "dpmpp_3m", i, {"x": x, **prev}, {"x_next": x_next, "x0": x0, "x0_prev_out": prev["x0_prev"]})
        prev = {"x0_prev": x0, "x0_prev2": prev["x0_prev"]}
        hist.append((x0, h))
        x = x_next
    return x


def sample_dpmpp_2m_sde(eps_fn: EpsFn, x: torch.Tensor, noise: NoiseFn, vp: VP = VP(), steps: int = 20,
                        grid: str = "logsnr", lower_order_final: bool = True, callback: Callback | None = None,
                        denoise_final: bool = False) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, the second-order multistep solver of the data-prediction reverse SDE,
    midpoint form): x_t = sigma_t / sigma_s e^-h x + alpha_t (1 - e^-2h) (D0 + D1 / 2) + sigma_t sqrt(1 - e^-2h) z,
    D0 = x0, D1 = (x0 - x0_prev) / r0; one noise call per step; first order (D1 = 0) at the first step and at the
    last when N < 15; a final step to t = 0 returns x0."""
    e = times(vp, steps - int(denoise_final), grid)
    x0_prev, h_prev = torch.zeros_like(x), None
    for i in range(steps):
        s = e[i]
        z = noise(i + 1)
        x0 = (x - vp.sigma(s) * eps_fn(x, _vec(s, x))) / vp.alpha(s)
        if denoise_final and i == steps - 1:
            _emit(callback, "dpmpp_2m_sde", i, {"x": x, "x0_prev": x0_prev, "noise": z}, {"x_next": x0, "x0": x0})
            return x0
        t = e[i + 1]
        h = float(vp.lam(t) - vp.lam(s))
        d = x0
        if h_prev is not None and not (lower_order_final and steps < 15 and i == steps - 1):
            d = x0 + 0.5 * (x0 - x0_prev) / (h_prev / h)
        x_next = (vp.sigma(t) / vp.sigma(s) * math.exp(-h) * x + vp.alpha(t) * -math.expm1(-2 * h) * d
                  + vp.sigma(t) * math.sqrt(-math.expm1(-2 * h)) * z)
        _emit(callback, "dpmpp_2m_sde", i, {"x": x, "x0_prev": x0_prev, "noise": z}, {"x_next": x_next, "x0": x0})
        x, x0_prev, h_prev = x_next, x0, h
    return x


# -- EDM Heun ------------------------------------------------------------------------------------------------------
def sample_edm_heun(eps_fn: EpsFn, x: torch.Tensor, vp: VP = VP(), steps: int = 10, grid: str = "edm",
                    callback: Callback | None = None) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 1 (deterministic Heun) for the VP model: with their scaling s(t) = alpha(t)
    and noise level sigma_K(t) = sigma(t) / alpha(t), the probability-flow ODE in x~ = x / s is
    dx~/dsigma_K = eps(s x~, t). Per step: an Euler step in sigma_K, then the trapezoidal (Heun) correction,
    mapped back to x by s(t_next)."""
    e = times(vp, steps, grid)
    for i in range(steps):
        t, tn = e[i], e[i + 1]
        sk, skn = vp.sigma(t) / vp.alpha(t), vp.sigma(tn) / vp.alpha(tn)
        xt = x / vp.alpha(t)
        d = eps_fn(x, _vec(t, x))
        x_euler = xt + (skn - sk) * d
        d2 = eps_fn(vp.alpha(tn) * x_euler, _vec(tn, x))
        x_next = vp.alpha(tn) * (xt + (skn - sk) * 0.5 * (d + d2))
        _emit(callback, "edm_heun", i, {"x": x}, {"x_next": x_next})
        x = x_next
    return x


# -- iPNDM and UniPC -----------------------------------------------------------------------------------------------
def sample_ipndm(eps_fn: EpsFn, x: torch.Tensor, vp: VP = VP(), steps: int = 10, grid: str = "edm",
                 callback: Callback | None = None) -> torch.Tensor:
    """iPNDM (Zhang & Chen 2023, DEIS): in x~ = x / alpha and s = sigma / alpha the probability-flow ODE is
    dx~/ds = eps; each step is Adams-Bashforth on the noise predictions with the orders 1, 2, 3, 4 (then 4):

        x~_next = x~ + (s_next - s) (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24      (newest e_0)

    and its lower-order forms (3 e_0 - e_1) / 2 and (23 e_0 - 16 e_1 + 5 e_2) / 12 while the history fills."""
    e = times(vp, steps, grid)
    hist: list[torch.Tensor] = []
    zero = torch.zeros_like(x)
    for i in range(steps):
        t, tn = e[i], e[i + 1]
        d = eps_fn(x, _vec(t, x))
        prev = (hist[::-1] + [zero] * 3)[:3]
        hist.append(d)
        k = min(len(hist), 4)
        if k == 1:
            combo = d
        elif k == 2:
            combo = (3 * d - prev[0]) / 2
        elif k == 3:
            combo = (23 * d - 16 * prev[0] + 5 * prev[1]) / 12
        else:
            combo = (55 * d - 59 * prev[0] + 37 * prev[1] - 9 * prev[2]) / 24
        s, sn = vp.sigma(t) / vp.alpha(t), vp.sigma(tn) / vp.alpha(tn)
        x_next = vp.alpha(tn) * (x / vp.alpha(t) + (sn - s) * combo)
        _emit(callback, "ipndm", i, {"x": x, "e_prev": prev[0], "e_prev2": prev[1], "e_prev3": prev[2]},
              {"x_next": x_next, "e": d, "e_prev_out": prev[0], "e_prev2_out": prev[1]})
        x = x_next
    return x


def _phi(z: float, k: int) -> float:
    """phi_k(z): phi_0 = e^z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z (exponential-integrator functions)."""
    value = math.exp(z)
    for j in range(k):
        value = (value - 1 / math.factorial(j)) / z
    return value


def _unipc_step(vp: VP, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor, hist: list[tuple[float, torch.Tensor]],
                order: int, variant: str, m_new: torch.Tensor | None = None) -> torch.Tensor:
    """One UniP (``m_new`` None) or UniC (``m_new``: the model at the point the step reached) update of order
    ``order`` from x at s to t, data prediction (Zhao et al. 2023, Algorithms 2 and 3 with B(h)). ``hist``:
    (lambda, data prediction) of the points so far, the one at s last."""
    lam_s, m_s = hist[-1]
    if float(vp.sigma(t)) == 0.0:  # a step to the data: the limit h -> inf of the first-order update
        return m_s
    h = float(vp.lam(t)) - lam_s
    hh = -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    r = [(hist[-1 - k][0] - lam_s) / h for k in range(1, order)]
    d = [(hist[-1 - k][1] - m_s) / r[k - 1] for k in range(1, order)]
    g = [hh * _phi(hh, k + 1) * math.factorial(k) / b_h for k in range(1, order + 1)]
    if m_new is None:
        rho = [0.5] if order == 2 else [] if order == 1 else \
            torch.linalg.solve(torch.tensor([[rk ** j for rk in r] for j in range(order - 1)], dtype=torch.float64),
                               torch.tensor(g[:-1], dtype=torch.float64)).tolist()
        res = sum((rho[k] * d[k] for k in range(order - 1)), torch.zeros_like(x))
    else:
        nodes = r + [1.0]
        rho = [0.5] if order == 1 else \
            torch.linalg.solve(torch.tensor([[rk ** j for rk in nodes] for j in range(order)], dtype=torch.float64),
                               torch.tensor(g, dtype=torch.float64)).tolist()
        res = sum((rho[k] * d[k] for k in range(order - 1)), torch.zeros_like(x)) + rho[-1] * (m_new - m_s)
    return vp.sigma(t) / vp.sigma(s) * x - vp.alpha(t) * math.expm1(hh) * m_s - vp.alpha(t) * b_h * res


def sample_unipc(eps_fn: EpsFn, x: torch.Tensor, vp: VP = VP(), steps: int = 10, grid: str = "logsnr",
                 order: int = 3, variant: str = "bh2", callback: Callback | None = None,
                 denoise_final: bool = False) -> torch.Tensor:
    """Multistep UniPC (Zhao et al. 2023, arXiv:2302.04867) with data prediction, as diffusers'
    ``UniPCMultistepScheduler`` runs it: at each step the model at the new point first corrects it (UniC, at
    the order of the step that reached it; not at the first step), then UniP predicts the next point at order
    min(order, i + 1, N - i). ``denoise_final``: N - 1 steps from 1 to eps, then a step to t = 0."""
    e = times(vp, steps - int(denoise_final), grid)
    if denoise_final:
        e = torch.cat([e, torch.zeros(1, dtype=torch.float64)])
    zero = torch.zeros_like(x)
    names = ["x0_prev", "x0_prev2"] + (["x0_prev3"] if order == 3 else [])
    state = {"x_prev": zero, **{k: zero for k in names}}
    hist: list[tuple[float, torch.Tensor]] = []
    last_order = 0
    for i in range(steps):
        t = e[i]
        m = (x - vp.sigma(t) * eps_fn(x, _vec(t, x))) / vp.alpha(t)
        inputs = {"x": x, **state}
        if i > 0:
            x = _unipc_step(vp, e[i - 1], t, state["x_prev"], hist, last_order, variant, m_new=m)
        hist.append((float(vp.lam(t)), m))
        p = min(order, i + 1, steps - i)
        x_next = _unipc_step(vp, t, e[i + 1], x, hist, p, variant)
        outputs = {"x_next": x_next, "x_c": x, "x0": m, "x0_prev_out": state["x0_prev"]}
        if order == 3:
            outputs["x0_prev2_out"] = state["x0_prev2"]
        _emit(callback, "unipc", i, inputs, outputs)
        state = {"x_prev": x, "x0_prev": m, "x0_prev2": state["x0_prev"], **({"x0_prev3": state["x0_prev2"]} if order == 3 else {})}
        last_order, x = p, x_next
    return x


# -- likelihood: the probability-flow ODE with its divergence (score_sde's likelihood.py) ---------------------------
def log_likelihood(eps_fn: EpsFn, x: torch.Tensor, vp: VP = VP(), rtol: float = 1e-10,
                   atol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """score_sde's likelihood with the exact divergence: x(eps) = x, dx/dt = -1/2 beta (x + score) up to t = 1 by
    scipy's adaptive DOP853 (score_sde uses RK45 at 1e-5), d(delta)/dt = div of that drift (the Jacobian's trace,
    one backward pass per element). Returns (log N(x(1); 0, I) + delta, x(1), delta): float64 [B], [B, ...], [B]."""
    from scipy.integrate import solve_ivp

    x = x.to(torch.float64)
    shape, n = x.shape, x[0].numel()

    def drift_and_divergence(t: float, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xt = y.reshape(shape).detach().requires_grad_(True)
        tv = _vec(t, xt)
        with torch.enable_grad():
            drift = -0.5 * _b(vp.beta(tv), xt) * (xt + _score(eps_fn, vp, xt, tv))
            flat = drift.reshape(len(xt), n)
            div = torch.zeros(len(xt), dtype=torch.float64)
            for i in range(n):
                (grad,) = torch.autograd.grad(flat[:, i].sum(), xt, retain_graph=i < n - 1)
                div = div + grad.reshape(len(xt), n)[:, i]
        return drift.detach(), div

    def rhs(t: float, y):
        drift, div = drift_and_divergence(t, torch.from_numpy(y[:-len(x)]))
        return torch.cat([drift.reshape(-1), div]).numpy()

    y0 = torch.cat([x.reshape(-1), torch.zeros(len(x), dtype=torch.float64)]).numpy()
    sol = solve_ivp(rhs, (vp.eps, 1.0), y0, method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference likelihood ODE: {sol.message}")
    y1 = torch.from_numpy(sol.y[:, -1])
    x1, delta = y1[:-len(x)].reshape(shape), y1[-len(x):]
    prior = -0.5 * (x1 * x1).reshape(len(x), -1).sum(1) - 0.5 * n * math.log(2 * math.pi)
    return prior + delta, x1, delta
