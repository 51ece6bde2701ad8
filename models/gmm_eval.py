"""Error figures of samples against a known :class:`GaussianMixture` (the sampler yardstick with ground truth).

- ``weight_error``: max_k |fraction of samples assigned to component k - w_k| (assignment: the true posterior);
- ``component_fd``: sum_k w_k FD(N(mean_k, cov_k) of the samples assigned to k, N(mu_k, diag sigma_k^2)),
  the Fréchet (2-Wasserstein^2) distance of each component's mean and covariance to the truth;
- ``mmd2``: MMD^2 (RBF kernel, bandwidth = median pairwise squared distance, diagonal excluded) against fresh
  exact draws of the same size.
An exact sample of the same size scored the same way gives each figure's sampling-noise floor.
"""

from __future__ import annotations

import numpy as np

from vpsde.models.digits_eval import frechet_gaussian
from vpsde.models.gmm import GaussianMixture


def assign(mix: GaussianMixture, x: np.ndarray) -> np.ndarray:
    """Most probable component of each sample [n, D] -> int [n]."""
    log_r = np.log(mix.weights) - 0.5 * (((x[:, None] - mix.means) / mix.stds) ** 2 + 2 * np.log(mix.stds)).sum(-1)
    return log_r.argmax(1)


def mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """MMD^2 between samples x [n, D] and y [m, D] with an RBF kernel of median-heuristic bandwidth."""
    z = np.concatenate([x, y]).astype(np.float64)
    sq = (z * z).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)
    k = np.exp(-d2 / np.median(d2[d2 > 0]))
    np.fill_diagonal(k, 0.0)
    n, m = len(x), len(y)
    a = np.r_[np.full(n, 1.0 / n), np.full(m, -1.0 / m)]
    return float(a @ k @ a)


def mixture_errors(mix: GaussianMixture, x: np.ndarray, rng: np.random.Generator, mmd_n: int = 2000) -> dict:
    """The three error figures of samples x [n, D] (float) against ``mix``; NaN/Inf samples give inf."""
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        return {"weight_error": float("inf"), "component_fd": float("inf"), "mmd2": float("inf")}
    label = assign(mix, x)
    weight_error, fd = 0.0, 0.0
    for k, w in enumerate(mix.weights):
        xk = x[label == k]
        weight_error = max(weight_error, abs(len(xk) / len(x) - w))
        if len(xk) < mix.dim + 2:
            return {"weight_error": weight_error, "component_fd": float("inf"), "mmd2": float("inf")}
        fd += w * frechet_gaussian(xk.mean(0), np.cov(xk, rowvar=False).reshape(mix.dim, mix.dim),
                                   mix.means[k], np.diag(mix.stds[k] ** 2))
    truth, _ = mix.sample(min(mmd_n, len(x)), rng)
    return {"weight_error": weight_error, "component_fd": fd, "mmd2": mmd2(x[:mmd_n], truth)}
