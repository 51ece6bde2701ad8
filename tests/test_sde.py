"""The VP-SDE math against float64 references, and the time grids."""

import math

import pytest
import torch

from vpsde.export.grids import time_grid
from vpsde.models.sde import VPSDE


def test_std_expm1_is_accurate_in_float32_near_eps():
    """std in float32 (expm1 form) within 4 ulp-ish (1e-6 relative) of the float64 value for t in [1e-5, 1];
    the naive sqrt(1 - exp) form loses ~1e-3 relative at t = 1e-5."""
    t64 = torch.cat([torch.logspace(-5, 0, 400, dtype=torch.float64), torch.rand(200, dtype=torch.float64)])
    t32 = t64.float()
    sde64 = VPSDE()
    ref = torch.sqrt(-torch.expm1(2 * sde64.log_mean_coeff(t32.double())))
    stable = VPSDE(std_formula="expm1").std(t32).double()
    naive = VPSDE(std_formula="diffusers").std(t32).double()
    assert ((stable - ref).abs() / ref).max() < 1e-6
    assert ((naive - ref).abs() / ref).max() > 1e-4  # the reason the stable form exists


def test_beta_and_marginal_match_closed_form():
    sde = VPSDE()
    t = torch.rand(100, dtype=torch.float64)
    assert torch.allclose(sde.beta(t), 0.1 + 19.9 * t)
    # d/dt log alpha(t) = -beta(t)/2
    tt = t.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(sde.log_mean_coeff(tt).sum(), tt)
    assert torch.allclose(g, -0.5 * sde.beta(t))


def test_diffusers_grid_matches_scheduler():
    from diffusers.schedulers.deprecated.scheduling_sde_vp import ScoreSdeVpScheduler

    for n in (10, 1000):
        sched = ScoreSdeVpScheduler()
        sched.set_timesteps(n)
        t, dt, sq = time_grid("diffusers", n, 1e-3)
        assert torch.equal(t, sched.timesteps)
        assert torch.equal(dt, torch.full((n,), -1.0 / n))
        assert torch.equal(sq, torch.full((n,), math.sqrt(1.0 / n)))  # float64 sqrt rounded once


@pytest.mark.parametrize("n", [1, 10, 1000])
def test_uniform_grid_ends_at_eps(n):
    t, dt, sq = time_grid("uniform", n, 1e-3)
    assert t[0] == 1.0 and (dt < 0).all()
    assert abs(float(t[-1].double() + dt[-1].double()) - 1e-3) < 1e-6
    assert abs(float(dt.double().sum()) + (1 - 1e-3)) < 1e-5
    assert torch.allclose(sq.double() ** 2, -dt.double(), rtol=1e-6)


def test_unknown_grid_is_refused():
    with pytest.raises(ValueError, match="unknown grid"):
        time_grid("cosine", 10, 1e-3)
