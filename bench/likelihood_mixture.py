"""Likelihood bundles on the rotated 4-D mixture: error against the float64 reference (score_sde's formulas, DOP853 at
1e-10) by steps, the reference against the closed-form log-density, the N(0, I) prior's mismatch, Hutchinson's bias
and spread, and the cost per input. Prints one table (docs/likelihood.md).

    .venv/bin/python bench/likelihood_mixture.py [--points 64] [--steps 4 8 16 32 64] [--seed 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vpsde.export import VPSDE, export_bundle, load_model
from vpsde.export.reference import VP, log_likelihood
from vpsde.models.gmm import GaussianMixture, GaussianMixtureScore
from vpsde.runtime import Sampler

MIXTURE = "gmm:dim=4,components=5,full=1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=64)
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    mixture = GaussianMixture.rotated()
    x, _ = mixture.sample(args.points, np.random.default_rng(args.seed))
    model = GaussianMixtureScore(mixture, VPSDE()).double()
    t0 = time.perf_counter()
    ref, x1, delta = (a.numpy() for a in log_likelihood(lambda y, t: model(y, t), torch.from_numpy(x)))
    ref_s = time.perf_counter() - t0
    vp, ends = VP(), torch.tensor([VP().eps, 1.0], dtype=torch.float64)
    alpha, sigma = vp.alpha(ends).numpy(), vp.sigma(ends).numpy()
    truth = mixture.marginal(alpha[0], sigma[0]).log_density(x)
    true_prior = delta + mixture.marginal(alpha[1], sigma[1]).log_density(x1)
    print(f"{args.points} points, seed {args.seed}; float64 reference {1000 * ref_s / args.points:.1f} ms/point")
    print(f"reference (true p_1) vs closed form: max |d| {np.abs(true_prior - truth).max():.2e} nats")
    print(f"N(0, I) prior vs true p_1: mean {np.mean(ref - true_prior):+.2e}, max |d| {np.abs(ref - true_prior).max():.2e} nats")
    print("divergence  steps  NFE  max|err|   mean err   sd err    ms/point (batch 64, all threads)")
    xf = x.astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for divergence in ("exact", "hutchinson"):
            for steps in args.steps if divergence == "exact" else [max(args.steps)]:
                bundle = export_bundle(load_model(MIXTURE, VPSDE()), Path(tmp) / f"{divergence}{steps}",
                                       sampler="likelihood", steps=steps, divergence=divergence, log=lambda _: None)
                sampler = Sampler(bundle, progress=False)
                sampler.log_likelihood(xf)  # warm-up
                t0 = time.perf_counter()
                err = sampler.log_likelihood(xf) - ref
                ms = 1000 * (time.perf_counter() - t0) / len(xf)
                print(f"{divergence:10s}  {steps:5d}  {4 * steps:3d}  {np.abs(err).max():.2e}  {err.mean():+.2e}  "
                      f"{err.std():.2e}  {ms:.3f}")


if __name__ == "__main__":
    main()
