"""Exact likelihood by the probability-flow ODE (Song et al. 2021, section 4.3 and appendix D.2): the step graph and
its schedule.

The ODE dx/dt = f(x, t) = -1/2 beta(t) x + 1/2 beta(t) eps(x, t) / sigma(t) carries the data x(eps) = x_0 to
x(1), and d log p_t(x(t)) / dt = -div f(x(t), t), so

    log p_eps(x_0) = log N(x(1); 0, I) + integral_eps^1 div f(x(t), t) dt.

The divergence is taken per element, so the host carries it as an ordinary [batch, *sample_shape] state:

    exact:        g_i = -1/2 beta + 1/2 beta / sigma * (J_eps)_ii              (one JVP per element)
    hutchinson:   g_i = -1/2 beta + 1/2 beta / sigma * mean_k v_k,i (J_eps v_k)_i   (one JVP per probe)

with J_eps the Jacobian of the noise prediction in x and each probe v_k a host noise input (Gaussian, or its sign:
Rademacher); the sum over i is div f exactly, or an unbiased estimate of it (E[v v^T] = I). Each step is one
classical Runge-Kutta 4 step of (x, g) from t_i up to t_{i+1}, probes fixed within the step and fresh for every
step (host noise calls, so reproducible from the seed and independent of the batch). The last step's output
``logp`` holds log N(x(1); 0, I) + the divergence integral element by element: a row's sum is log p_eps(x_0) in
nats.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch.func import jvp
from torch.overrides import TorchFunctionMode

from vpsde.export.steps import Step, per_sample
from vpsde.models.base import ScoreModel
from vpsde.models.sde import VPSDE

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
MAX_EXACT_NUMEL = 64
"""The exact divergence takes one JVP per sample element and stage: beyond this many elements, use hutchinson."""
MAX_PROBES = 16


def group_norm_ops(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
    """F.group_norm in plain ops (x [N, C, *], statistics per sample and group of C / groups channels, biased
    variance), for forward-mode tracing: its derivative traces to fewer nodes than torch's group_norm rule."""
    n, c = x.shape[:2]
    grouped = x.reshape(n, groups, -1)
    centered = grouped - grouped.mean(-1, keepdim=True)
    rstd = torch.rsqrt((centered * centered).mean(-1, keepdim=True) + eps)
    y = (centered * rstd).reshape(x.shape)
    affine = (1, c, *([1] * (x.dim() - 2)))
    if weight is not None:
        y = y * weight.reshape(affine)
    return y if bias is None else y + bias.reshape(affine)


class PlainGroupNorm(TorchFunctionMode):
    """While active, ``F.group_norm`` (and so ``nn.GroupNorm``) runs as :func:`group_norm_ops`."""

    _signature = inspect.signature(F.group_norm)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.group_norm:
            bound = self._signature.bind(*args, **(kwargs or {}))
            bound.apply_defaults()
            a = bound.arguments
            return group_norm_ops(a["input"], a["num_groups"], a["weight"], a["bias"], a["eps"])
        return func(*args, **(kwargs or {}))


def probe_names(probes: int) -> list[str]:
    """The noise inputs of ``probes`` Hutchinson probes: probe, probe_1, ..."""
    return ["probe" if k == 0 else f"probe_{k}" for k in range(probes)]


class LikelihoodStep(Step):
    """One RK4 step of the probability-flow ODE with its divergence (module docstring), t_i -> t_{i+1} = t_i + h.

    Inputs x, logdet (state: the divergence integral so far, per element: the flow's log-determinant), t, t_mid,
    t_next, h (float32 [B]) and the probes (hutchinson only; [B, *sample_shape], N(0, 1) host noise); outputs
    x_next, logdet_next and logp = log N(x_next; 0, I) + logdet_next per element. 4 model calls and 4 x (probes or elements) JVPs per step.
    """

    kind = "likelihood"
    output_names = ("x_next", "logdet_next", "logp")
    forward_ad = True  # traced by export/polymorphic.py

    def __init__(self, model: ScoreModel, sde: VPSDE, divergence: str = "hutchinson", probes: int = 1,
                 probe: str = "rademacher") -> None:
        super().__init__(model, sde)
        numel = math.prod(model.sample_shape)
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
        if divergence == "exact" and numel > MAX_EXACT_NUMEL:
            raise ValueError(f"the exact divergence takes one JVP per element and stage; {model.name} has {numel} "
                             f"elements (at most {MAX_EXACT_NUMEL}): use divergence 'hutchinson'")
        if probe not in PROBES:
            raise ValueError(f"probe must be one of {', '.join(PROBES)}, got {probe!r}")
        if divergence == "hutchinson" and not 1 <= probes <= MAX_PROBES:
            raise ValueError(f"probes must be 1..{MAX_PROBES}, got {probes}")
        self.divergence, self.probe = divergence, probe
        self.probe_inputs = probe_names(probes) if divergence == "hutchinson" else []
        self.input_names = ("x", "logdet", "t", "t_mid", "t_next", "h", *self.probe_inputs)

    def forward(self, x: torch.Tensor, logdet: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor,
                t_next: torch.Tensor, h: torch.Tensor, *probes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.divergence == "exact":
            basis = torch.eye(x[0].numel(), dtype=x.dtype).reshape(-1, *x.shape[1:])
            directions = [torch.zeros_like(x) + e for e in basis]
        else:
            directions = [torch.where(p >= 0, 1.0, -1.0) if self.probe == "rademacher" else p for p in probes]
        h = per_sample(h, x)
        k1, g1 = self.field(x, t, directions)
        k2, g2 = self.field(x + 0.5 * h * k1, t_mid, directions)
        k3, g3 = self.field(x + 0.5 * h * k2, t_mid, directions)
        k4, g4 = self.field(x + h * k3, t_next, directions)
        x_next = x + h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        logdet_next = logdet + h / 6.0 * (g1 + 2.0 * g2 + 2.0 * g3 + g4)
        logp = -0.5 * (x_next * x_next + math.log(2.0 * math.pi)) + logdet_next
        return x_next, logdet_next, logp

    def field(self, x: torch.Tensor, t: torch.Tensor,
              directions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """f(x, t) and the per-element divergence terms g (module docstring), each [B, *sample_shape]."""
        trace = torch.zeros_like(x)
        for v in directions:
            with PlainGroupNorm():
                eps, jv = jvp(lambda y: self.model(y, t), (x,), (v,))
            trace = trace + v * jv
        if self.divergence == "hutchinson":
            trace = trace / len(directions)
        half_beta = per_sample(0.5 * self.sde.beta(t), x)
        scale = half_beta / per_sample(self.sde.std(t), x)
        return scale * eps - half_beta * x, scale * trace - half_beta


def likelihood_schedule(edges: torch.Tensor) -> dict[str, torch.Tensor]:
    """RK4 schedule from reverse-time ``edges`` (float64 [N + 1], 1 down to eps): the same times run forward,
    t, t_mid, t_next, h float64 [N]."""
    up = torch.flip(edges, (0,))
    t, t_next = up[:-1], up[1:]
    return {"t": t, "t_mid": 0.5 * (t + t_next), "t_next": t_next, "h": t_next - t}
