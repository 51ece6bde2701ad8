"""Error figures of samples against a known :class:`GaussianMixture` (the sampler yardstick with ground truth).

Samples are assigned to components by the true posterior (most probable component). Per component k:

- ``weight_error``: max_k |fraction of samples assigned to k - w_k|;
- ``mean_error``: max_k of the Mahalanobis length of (sample mean_k - mu_k) under Sigma_k;
- ``cov_error``: max_k ||Sigma_k^(-1/2) S_k Sigma_k^(-1/2) - I||_F, the whitened error of the sample covariance
  S_k (scale-free: a 10% error in one axis reads 0.2 whatever that axis' std);
- ``component_fd``: sum_k w_k FD(N(mean_k, S_k), N(mu_k, Sigma_k)), the Fréchet (2-Wasserstein^2) distance;

and over the whole sample, against fresh exact draws of the same size:

- ``sw1``: sliced Wasserstein-1 over 256 fixed random directions (mean over directions of the 1-D W1);
- ``low_density``: the fraction of samples whose true log-density lies below the exact draws' 1st percentile
  (0.01 for exact samples; mass leaking between modes shows here first);
- ``mmd2``: MMD^2 (RBF kernel, bandwidth = median pairwise squared distance, diagonal excluded), first 2000.

Truncation of the mixture (posterior assignment) biases the per-component figures slightly for overlapping
components; exact samples scored the same way carry the same bias, so always read a figure against the floor:
:func:`exact_floor` scores independent exact samples of the same size.
"""

from __future__ import annotations

import numpy as np

from vpsde.models.digits_eval import frechet_gaussian
from vpsde.models.gmm import GaussianMixture

FIGURES = ("weight_error", "mean_error", "cov_error", "component_fd", "sw1", "low_density", "mmd2")
SLICES = 256


def assign(mix: GaussianMixture, x: np.ndarray) -> np.ndarray:
    """Most probable component of each sample [n, D] -> int [n]."""
    return mix.component_log_density(x).argmax(1)


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


def sliced_w1(x: np.ndarray, y: np.ndarray, slices: int = SLICES, seed: int = 0) -> float:
    """Sliced Wasserstein-1 between equal-size samples x, y [n, D]: the mean over ``slices`` unit directions
    (drawn from ``seed``, the same for every call) of the 1-D W1 of the projections (mean |sorted difference|)."""
    if len(x) != len(y):
        raise ValueError(f"sliced_w1 needs equal sizes, got {len(x)} and {len(y)}")
    d = np.random.default_rng(seed).standard_normal((x.shape[1], slices))
    d /= np.linalg.norm(d, axis=0)
    return float(np.abs(np.sort(x @ d, axis=0) - np.sort(y @ d, axis=0)).mean())


def mixture_errors(mix: GaussianMixture, x: np.ndarray, rng: np.random.Generator, mmd_n: int = 2000) -> dict:
    """The figures of :data:`FIGURES` for samples x [n, D] against ``mix``; NaN/Inf samples or a component with
    too few samples to fit give inf. ``rng`` draws the exact comparison samples."""
    x = np.asarray(x, dtype=np.float64)
    out = dict.fromkeys(FIGURES, float("inf"))
    if not np.isfinite(x).all():
        return out
    truth, _ = mix.sample(len(x), rng)
    label = assign(mix, x)
    weight_error, mean_error, cov_error, fd = 0.0, 0.0, 0.0, 0.0
    for k, w in enumerate(mix.weights):
        xk = x[label == k]
        weight_error = max(weight_error, abs(len(xk) / len(x) - w))
        if len(xk) < mix.dim + 2:
            out["weight_error"] = weight_error
            return out
        mean, cov = xk.mean(0), np.cov(xk, rowvar=False).reshape(mix.dim, mix.dim)
        # whitening by the true axes: W = diag(1/std) R^T, so W Sigma W^T = I
        whiten = mix.rotations[k].T / mix.stds[k][:, None]
        mean_error = max(mean_error, float(np.linalg.norm(whiten @ (mean - mix.means[k]))))
        cov_error = max(cov_error, float(np.linalg.norm(whiten @ cov @ whiten.T - np.eye(mix.dim))))
        fd += w * frechet_gaussian(mean, cov, mix.means[k], mix.covariances[k])
    floor = np.percentile(mix.log_density(truth), 1.0)
    out.update(weight_error=weight_error, mean_error=mean_error, cov_error=cov_error, component_fd=fd,
               sw1=sliced_w1(x, truth), low_density=float((mix.log_density(x) < floor).mean()),
               mmd2=mmd2(x[:mmd_n], truth[:mmd_n]))
    return out


def exact_floor(mix: GaussianMixture, n: int, draws: int, rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """Each figure for ``draws`` independent exact samples of size n: {"median": {...}, "max": {...}} (the
    sampling-noise floor a sampler's figure is read against)."""
    scored = [mixture_errors(mix, mix.sample(n, rng)[0], rng) for _ in range(draws)]
    return {"median": {k: float(np.median([s[k] for s in scored])) for k in FIGURES},
            "max": {k: float(np.max([s[k] for s in scored])) for k in FIGURES}}
