"""Sampler steps as traceable torch modules: everything a step needs comes in as an input (stateless)."""

from __future__ import annotations

import torch
from torch import nn

from vpsde.models.sde import VPSDE
from vpsde.models.base import ScoreModel


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector [B] to broadcast against ``like`` [B, ...]."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


class EulerMaruyamaStep(nn.Module):
    """One Euler-Maruyama step of the reverse-time VP-SDE (diffusers ``step_pred``, score_sde
    ``EulerMaruyamaPredictor``).

        score  = -eps(x, t) / std(t)
        drift  = -1/2 beta(t) x - beta(t) score
        x_mean = x + drift dt
        x_next = x_mean + sqrt(beta(t)) sqrt(-dt) noise

    ``forward(x, t, dt, sqrt_neg_dt, noise) -> (x_next, x_mean)``: x, noise float32 [B, *sample_shape];
    t, dt, sqrt_neg_dt float32 [B] (per sample, dt < 0). sqrt_neg_dt = sqrt(-dt) comes from the schedule,
    computed in float64 from the exact step and rounded once: a float32 sqrt of the rounded dt differs in the
    last bit for N = 20, 50, 1000 (diffusers computes ``math.sqrt(-dt)`` in float64, too). The expression
    order is diffusers' (including beta written as sqrt(beta)^2), so with ``std_formula="diffusers"`` the
    result is bit-identical to ``ScoreSdeVpScheduler.step_pred`` in float32.
    """

    kind = "em"
    input_names = ("x", "t", "dt", "sqrt_neg_dt", "noise")
    output_names = ("x_next", "x_mean")

    def __init__(self, model: ScoreModel, sde: VPSDE) -> None:
        super().__init__()
        self.model = model
        self.sde = sde

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, sqrt_neg_dt: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        score = -self.model(x, t) / per_sample(self.sde.std(t), x)
        beta_t = per_sample(self.sde.beta(t), x)
        diffusion = torch.sqrt(beta_t)
        drift = -0.5 * beta_t * x - diffusion**2 * score
        x_mean = x + drift * per_sample(dt, x)
        x_next = x_mean + diffusion * per_sample(sqrt_neg_dt, x) * noise
        return x_next, x_mean


STEP_KINDS: dict[str, type[nn.Module]] = {EulerMaruyamaStep.kind: EulerMaruyamaStep}
