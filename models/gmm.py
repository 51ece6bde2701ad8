"""An analytic ground truth: a Gaussian-mixture data distribution and its exact VP-SDE score.

Data: x_0 ~ sum_k w_k N(mu_k, Sigma_k) in R^D with Sigma_k = R_k diag(sigma_k^2) R_k^T (R_k orthogonal; the
identity for an axis-aligned mixture). Under the VP-SDE, x_t = a(t) x_0 + s(t) z, so the marginal is again a
mixture, sum_k w_k N(a mu_k, R_k diag(C_k) R_k^T) with C_k = a^2 sigma_k^2 + s^2, whose score is
    grad log p_t(x) = sum_k r_k(x) R_k (R_k^T (a mu_k - x) / C_k),
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
    """Mixture parameters: weights [K] (sum 1), means [K, D], stds [K, D] (> 0: the standard deviations along
    each component's principal axes) and rotations [K, D, D] (orthogonal; column j of R_k is the axis of
    stds[k, j]; None = identity, an axis-aligned mixture)."""

    weights: np.ndarray
    means: np.ndarray
    stds: np.ndarray
    rotations: np.ndarray | None = None

    def __post_init__(self) -> None:
        w, m, s = (np.asarray(a, dtype=np.float64) for a in (self.weights, self.means, self.stds))
        if w.ndim != 1 or m.shape != (w.size, m.shape[-1]) or s.shape != m.shape:
            raise ValueError(f"GaussianMixture: need weights [K], means [K, D], stds [K, D]; got "
                             f"{w.shape}, {m.shape}, {s.shape}")
        if abs(w.sum() - 1) > 1e-9 or (w <= 0).any() or (s <= 0).any():
            raise ValueError("GaussianMixture: weights must be positive and sum to 1, stds positive")
        r = np.broadcast_to(np.eye(m.shape[1]), (w.size, m.shape[1], m.shape[1])).copy() \
            if self.rotations is None else np.asarray(self.rotations, dtype=np.float64)
        if r.shape != (w.size, m.shape[1], m.shape[1]) or \
                not np.allclose(r @ r.transpose(0, 2, 1), np.eye(m.shape[1]), atol=1e-9):
            raise ValueError(f"GaussianMixture: rotations must be orthogonal [K, D, D] = {(w.size, *m.shape[1:]*2)}, "
                             f"got shape {r.shape}")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "means", m)
        object.__setattr__(self, "stds", s)
        object.__setattr__(self, "rotations", r)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def covariances(self) -> np.ndarray:
        """Sigma_k = R_k diag(stds_k^2) R_k^T, float64 [K, D, D]."""
        return np.einsum("kij,kj,klj->kil", self.rotations, self.stds**2, self.rotations)

    def marginal(self, alpha: float, sigma: float) -> "GaussianMixture":
        """The mixture of alpha x_0 + sigma z, z ~ N(0, I): the VP-SDE's marginal at the t of alpha, sigma."""
        return GaussianMixture(self.weights, alpha * self.means, np.sqrt((alpha * self.stds) ** 2 + sigma**2),
                               self.rotations)

    def log_density(self, x: np.ndarray) -> np.ndarray:
        """log p(x) of points x [n, D] -> float64 [n]."""
        return _logsumexp(self.component_log_density(x), axis=1)

    def component_log_density(self, x: np.ndarray) -> np.ndarray:
        """log w_k + log N(x; mu_k, Sigma_k) of points x [n, D] -> float64 [n, K]."""
        y = np.einsum("nkd,kde->nke", np.asarray(x, np.float64)[:, None] - self.means, self.rotations) / self.stds
        return (np.log(self.weights) - 0.5 * (y * y).sum(-1) - np.log(self.stds).sum(-1)
                - 0.5 * self.dim * math.log(2 * math.pi))

    @classmethod
    def default(cls, dim: int = 2, components: int = 3, seed: int = 0) -> "GaussianMixture":
        """A well-separated mixture: means on a circle (first two dims) of radius 2, unequal weights."""
        if dim < 1 or components < 1:
            raise ValueError(f"GaussianMixture.default needs dim >= 1 and components >= 1, got {dim}, {components}")
        rng = np.random.default_rng(seed)
        angles = 2 * np.pi * np.arange(components) / components
        means = np.zeros((components, dim))
        means[:, 0], means[:, min(1, dim - 1)] = 2 * np.cos(angles), 2 * np.sin(angles)
        if dim > 2:
            means[:, 2:] = rng.uniform(-1, 1, size=(components, dim - 2))
        weights = np.arange(components, 0, -1, dtype=np.float64)
        stds = rng.uniform(0.25, 0.5, size=(components, dim))
        return cls(weights / weights.sum(), means, stds)

    @classmethod
    def rotated(cls, dim: int = 4, components: int = 5, seed: int = 0) -> "GaussianMixture":
        """A harder mixture: full covariances (random rotations), axis stds log-uniform in [0.1, 2], unequal
        weights (proportional to components, ..., 1, e.g. 0.33/0.27/0.20/0.13/0.07 for 5), means spread up to
        |mu| = 9 with the last component overlapping the first (its mean 1.5 from it)."""
        if dim < 2 or components < 2:
            raise ValueError(f"GaussianMixture.rotated needs dim >= 2 and components >= 2, got {dim}, {components}")
        rng = np.random.default_rng(seed)
        directions = rng.standard_normal((components, dim))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        means = directions * np.linspace(3.0, 9.0, components)[:, None]
        means[-1] = means[0] + 1.5 * directions[-1]
        stds = np.exp(rng.uniform(math.log(0.1), math.log(2.0), size=(components, dim)))
        q, r = np.linalg.qr(rng.standard_normal((components, dim, dim)))
        rotations = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]  # Haar-distributed
        weights = np.arange(components, 0, -1, dtype=np.float64)
        return cls(weights / weights.sum(), means, stds, rotations)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n exact draws from the data distribution: (x [n, D] float64, component labels [n] int)."""
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        z = self.stds[k] * rng.standard_normal((n, self.dim))
        return self.means[k] + np.einsum("nij,nj->ni", self.rotations[k], z), k

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist(), "means": self.means.tolist(), "stds": self.stds.tolist(),
                "rotations": self.rotations.tolist()}


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


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
        self.rotate = not np.array_equal(mixture.rotations, np.broadcast_to(np.eye(mixture.dim),
                                                                            mixture.rotations.shape))
        if self.rotate:
            self.register_buffer("rot", torch.tensor(mixture.rotations, dtype=torch.float32))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.sde.mean_coeff(t)[:, None, None]  # [B, 1, 1]
        s = self.sde.std(t)[:, None, None]
        cov = a * a * self.var + s * s  # [B, K, D]: the marginal's variances along each component's axes
        diff = x[:, None, :] - a * self.mu  # [B, K, D]
        if self.rotate:  # into each component's axes: y_k = R_k^T diff_k
            diff = (diff[:, :, None, :] @ self.rot.to(diff.dtype))[:, :, 0, :]  # fp16 copies: diff is float32
        log_n = -0.5 * ((diff * diff / cov) + torch.log(cov)).sum(-1) - 0.5 * self.mu.shape[1] * math.log(2 * math.pi)
        resp = torch.softmax(self.log_w + log_n, dim=-1)  # [B, K]
        v = diff / cov
        if self.rotate:  # back: R_k v_k
            v = (v[:, :, None, :] @ self.rot.transpose(1, 2).to(v.dtype))[:, :, 0, :]
        return s[:, 0] * (resp[:, :, None] * v).sum(1)  # eps = -s * score
