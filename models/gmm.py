"""An analytic ground truth: a Gaussian-mixture data distribution and its exact VP-SDE score.

Data: x_0 ~ sum_k w_k N(mu_k, diag(sigma_k^2)) in R^D. Under the VP-SDE, x_t = a(t) x_0 + s(t) z, so the
marginal is again a mixture, sum_k w_k N(a mu_k, diag(a^2 sigma_k^2 + s^2)), whose score is
    grad log p_t(x) = sum_k r_k(x) (a mu_k - x) / C_k,     C_k = a^2 sigma_k^2 + s^2,
with r_k the posterior responsibilities. The model returns eps = -s * score, like a trained network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from vpsde.models.base import ScoreModel


class _Marginal(Protocol):
    def mean_coeff(self, t: torch.Tensor) -> torch.Tensor: ...
    def std(self, t: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class GaussianMixture:
    """Mixture parameters: weights [K] (sum 1), means [K, D], stds [K, D] (diagonal, > 0)."""

    weights: np.ndarray
    means: np.ndarray
    stds: np.ndarray

    def __post_init__(self) -> None:
        w, m, s = (np.asarray(a, dtype=np.float64) for a in (self.weights, self.means, self.stds))
        if w.ndim != 1 or m.shape != (w.size, m.shape[-1]) or s.shape != m.shape:
            raise ValueError(f"GaussianMixture: need weights [K], means [K, D], stds [K, D]; got "
                             f"{w.shape}, {m.shape}, {s.shape}")
        if abs(w.sum() - 1) > 1e-9 or (w <= 0).any() or (s <= 0).any():
            raise ValueError("GaussianMixture: weights must be positive and sum to 1, stds positive")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "means", m)
        object.__setattr__(self, "stds", s)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def default(cls, dim: int = 2, components: int = 3, seed: int = 0) -> "GaussianMixture":
        """A well-separated mixture: means on a circle (first two dims) of radius 2, unequal weights."""
        rng = np.random.default_rng(seed)
        angles = 2 * np.pi * np.arange(components) / components
        means = np.zeros((components, dim))
        means[:, 0], means[:, min(1, dim - 1)] = 2 * np.cos(angles), 2 * np.sin(angles)
        if dim > 2:
            means[:, 2:] = rng.uniform(-1, 1, size=(components, dim - 2))
        weights = np.arange(components, 0, -1, dtype=np.float64)
        stds = rng.uniform(0.25, 0.5, size=(components, dim))
        return cls(weights / weights.sum(), means, stds)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n exact draws from the data distribution: (x [n, D] float64, component labels [n] int)."""
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        return self.means[k] + self.stds[k] * rng.standard_normal((n, self.dim)), k

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist(), "means": self.means.tolist(), "stds": self.stds.tolist()}


class GaussianMixtureScore(ScoreModel):
    """Exact eps-prediction of a :class:`GaussianMixture` under a VP-SDE; sample shape [D], time label "t"."""

    time_label = "t"

    def __init__(self, mixture: GaussianMixture, sde: _Marginal, name: str = "gmm") -> None:
        super().__init__()
        self.mixture = mixture
        self.sde = sde
        self.name = name
        self.sample_shape = (mixture.dim,)
        self.register_buffer("log_w", torch.tensor(np.log(mixture.weights), dtype=torch.float32))
        self.register_buffer("mu", torch.tensor(mixture.means, dtype=torch.float32))
        self.register_buffer("var", torch.tensor(mixture.stds**2, dtype=torch.float32))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.sde.mean_coeff(t)[:, None, None]  # [B, 1, 1]
        s = self.sde.std(t)[:, None, None]
        cov = a * a * self.var + s * s  # [B, K, D]
        diff = x[:, None, :] - a * self.mu  # [B, K, D]
        log_n = -0.5 * ((diff * diff / cov) + torch.log(cov)).sum(-1) - 0.5 * self.mu.shape[1] * math.log(2 * math.pi)
        resp = torch.softmax(self.log_w + log_n, dim=-1)  # [B, K]
        return s[:, 0] * (resp[:, :, None] * diff / cov).sum(1)  # eps = -s * score
