"""Eager EulerMaruyamaStep == diffusers ScoreSdeVpScheduler.step_pred, bit for bit (float32, same noise)."""

import pytest
import torch
from diffusers.schedulers.deprecated.scheduling_sde_vp import ScoreSdeVpScheduler

from vpsde.export.grids import time_grid
from vpsde.export.steps import EulerMaruyamaStep
from vpsde.models.sde import VPSDE

from conftest import tiny_unet


@pytest.mark.parametrize("steps", [1000, 10])
@pytest.mark.parametrize("batch", [1, 4])
def test_em_step_bit_exact_with_diffusers(steps, batch, rng):
    """Every step of the N-step diffusers grid, fresh random x and noise per step: torch.equal on both outputs."""
    model = tiny_unet()
    step = EulerMaruyamaStep(model, VPSDE(std_formula="diffusers"))
    sched = ScoreSdeVpScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    _, dt, sqrt_neg_dt = time_grid("diffusers", steps, 1e-3)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            x = 2 * torch.randn((batch, 1, 16, 16), generator=rng)
            t_vec = t.repeat(batch)
            seed = int(torch.randint(0, 2**31, (1,), generator=rng))
            ref_x, ref_mean = sched.step_pred(model(x, t_vec), x, t_vec, generator=torch.Generator().manual_seed(seed))
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
            x_next, x_mean = step(x, t_vec, dt[i].repeat(batch), sqrt_neg_dt[i].repeat(batch), noise)
            assert torch.equal(x_mean, ref_mean), f"x_mean differs at step {i} (t={t.item()})"
            assert torch.equal(x_next, ref_x), f"x_next differs at step {i} (t={t.item()})"
            assert torch.isfinite(x_next).all()


def test_float32_sqrt_of_dt_would_break_parity():
    """Why sqrt(-dt) is a schedule input: sqrt in float32 of the rounded dt differs from diffusers'
    math.sqrt(-dt) (float64, rounded once) at N = 1000."""
    _, dt, sq = time_grid("diffusers", 1000, 1e-3)
    assert not torch.equal(torch.sqrt(-dt), sq)
