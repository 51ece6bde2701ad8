"""The variance-preserving SDE (Song et al. 2021), the one place its coefficients are computed.

    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,     beta(t) = beta_min + t (beta_max - beta_min),  t in [0, 1]

Marginal: x_t = exp(lmc(t)) x_0 + std(t) z,  lmc(t) = -1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min,
std(t) = sqrt(1 - exp(2 lmc(t))).

Every step module, every eager reference and the manifest's schedule arrays are computed from this module.
Functions take ``t`` as a torch tensor of any shape (continuous time, dimensionless) and return a tensor of
the same shape and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

StdFormula = Literal["expm1", "diffusers"]


def neg_expm1(y: torch.Tensor) -> torch.Tensor:
    """1 - exp(y) without cancellation for y near 0, using ONNX-exportable ops only.

    ONNX has no Expm1 op, so use the exact identity  exp(y) - 1 = 2 exp(y/2) sinh(y/2): Sinh is accurate
    for small arguments in torch, ONNX Runtime and TensorRT alike.
    """
    half = 0.5 * y
    return -2.0 * torch.exp(half) * torch.sinh(half)


@dataclass(frozen=True)
class VPSDE:
    """Linear-beta VP-SDE.

    Attributes:
        beta_min, beta_max: beta(0) and beta(1), units of 1/time (defaults of the paper: 0.1, 20).
        sampling_eps: smallest time the sampler evaluates the model at (default 1e-3).
        num_train_timesteps: N of the discretised DDPM view (diffusers' config field; metadata here).
        std_formula: "expm1" computes std = sqrt(-expm1(2 lmc)), stable in float32 near t = 0;
            "diffusers" computes sqrt(1 - exp(2 lmc)) exactly as diffusers' ``step_pred`` does, for bit parity.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    sampling_eps: float = 1e-3
    num_train_timesteps: int = 1000
    std_formula: StdFormula = "expm1"

    def __post_init__(self) -> None:
        if not 0 <= self.beta_min < self.beta_max:
            raise ValueError(f"need 0 <= beta_min < beta_max, got {self.beta_min}, {self.beta_max}")
        if not 0 < self.sampling_eps < 1:
            raise ValueError(f"need 0 < sampling_eps < 1, got {self.sampling_eps}")
        if self.std_formula not in ("expm1", "diffusers"):
            raise ValueError(f"std_formula must be 'expm1' or 'diffusers', got {self.std_formula!r}")

    # The expression order below is diffusers' (scheduling_sde_vp.step_pred): it decides the float32 bits.
    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """beta(t) = beta_min + t (beta_max - beta_min)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log of the mean coefficient: -1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min."""
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """alpha(t) = exp(log_mean_coeff(t)): x_t = alpha x_0 + std z."""
        return torch.exp(self.log_mean_coeff(t))

    def std(self, t: torch.Tensor) -> torch.Tensor:
        """Marginal standard deviation sqrt(1 - exp(2 lmc(t)))."""
        two_lmc = 2.0 * self.log_mean_coeff(t)
        if self.std_formula == "diffusers":
            return torch.sqrt(1.0 - torch.exp(two_lmc))
        return torch.sqrt(neg_expm1(two_lmc))
