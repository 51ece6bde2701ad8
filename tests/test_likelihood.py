"""Exact likelihood bundles (export/likelihood.py, Sampler.log_likelihood, vpsde likelihood) against the mixture's
closed-form log-density, a float64 reference ODE written from score_sde's formulas, and an eager float64 RK4 step."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_unet
from vpsde.cli.main import main as cli
from vpsde.export import VPSDE, export_bundle, load_model
from vpsde.export.polymorphic import batch_polymorphic
from vpsde.export.reference import VP, log_likelihood
from vpsde.models.gmm import GaussianMixture, GaussianMixtureScore
from vpsde.runtime import Bundle, Sampler
from vpsde.runtime.errors import BundleError, InputError
from vpsde.runtime.likelihood import bits_per_dim, dequantize
from vpsde.runtime.loop import infer_once

MIXTURE = "gmm:dim=4,components=5,full=1"  # GaussianMixture.rotated(): the 4-D yardstick
STEPS = 32


@pytest.fixture(scope="module")
def exact_bundle(tmp_path_factory):
    return export_bundle(load_model(MIXTURE, VPSDE()), tmp_path_factory.mktemp("lik") / "exact", sampler="likelihood",
                         steps=STEPS, divergence="exact", log=lambda _: None)


@pytest.fixture(scope="module")
def hutchinson_bundle(tmp_path_factory):
    return export_bundle(load_model(MIXTURE, VPSDE()), tmp_path_factory.mktemp("lik") / "hutch",
                         sampler="likelihood", steps=STEPS, log=lambda _: None)


@pytest.fixture(scope="module")
def mixture_points():
    """Fresh draws from the data distribution (a new seed every run) and their float64 reference log-likelihood."""
    mixture = GaussianMixture.rotated()
    seed = int(np.random.default_rng().integers(2**32))
    x, _ = mixture.sample(48, np.random.default_rng(seed))
    model = GaussianMixtureScore(mixture, VPSDE()).double()
    logp, x1, delta = log_likelihood(lambda y, t: model(y, t), torch.from_numpy(x))
    return mixture, x, logp.numpy(), x1.numpy(), delta.numpy()


def test_reference_equals_the_mixtures_closed_form_log_density(mixture_points):
    """The reference ODE (float64, DOP853 at 1e-10) with the true marginal p_1 at t = 1 in place of N(0, I) must give
    the closed-form log p_eps: integrating div f along the flow is the instantaneous change of variables."""
    mixture, x, _, x1, delta = mixture_points
    vp, ends = VP(), torch.tensor([VP().eps, 1.0], dtype=torch.float64)
    alpha, sigma = vp.alpha(ends).numpy(), vp.sigma(ends).numpy()
    with_true_prior = delta + mixture.marginal(alpha[1], sigma[1]).log_density(x1)
    truth = mixture.marginal(alpha[0], sigma[0]).log_density(x)
    assert np.abs(with_true_prior - truth).max() < 1e-5  # measured 1.5e-6: the adaptive solver's tolerance


def program_log_likelihood(bundle, side, x: np.ndarray) -> np.ndarray:
    """The bundle's likelihood program run on ``side`` (an eager float64 side: the same steps without float32's
    rounding) from the points ``x`` -> log p, float64 [N]."""
    from vpsde.runtime.likelihood import row_log_likelihood
    from vpsde.runtime.program import HostTrajectory, Program

    program = Program.compile(bundle.manifest)
    trajectory = HostTrajectory(program, x)
    for i in program.steps_to_run():
        for call in program.calls:
            trajectory.advance(side(call.graph, trajectory.feed(i, call, {})))
    return row_log_likelihood(np.asarray(trajectory.result))


def test_exact_divergence_bundle_matches_the_reference(exact_bundle, mixture_points):
    """32 RK4 steps on the logsnr grid. Against the same 32 steps in float64 (the eager program), every point within
    float32's rounding: measured at most 8e-6 nats over 5 draws of 48 points, bar 1e-4. Against the adaptive float64
    reference the error is also the 32 steps' own: typical 1e-4 nats, the 90th percentile under 5e-3 (at most 2.8e-3
    over 60 draws of 48 points), and a tail from points deep in the narrowest components (std 0.1, stiff near t =
    eps), which the float64 program shares: a draw's worst point was off by 1.3e-2 nats in the median draw and by
    0.60 at worst over those 60 draws (2 of them past the 0.15 this test once held the worst point to, so it failed
    about one run in 30; docs/likelihood.md)."""
    from vpsde.export.eager import EagerSide

    _, x, ref, _, _ = mixture_points
    logp = Sampler(exact_bundle, progress=False).log_likelihood(x.astype(np.float32))
    assert np.isfinite(logp).all()
    same_steps = program_log_likelihood(exact_bundle, EagerSide(exact_bundle, dtype=torch.float64), x)
    assert np.abs(logp - same_steps).max() < 1e-4
    assert np.quantile(np.abs(logp - ref), 0.9) < 5e-3
    assert ref.std() > 1.0  # the points differ: agreement is not a constant


def test_hutchinson_is_unbiased_within_its_standard_error(hutchinson_bundle, mixture_points):
    _, x, ref, _, _ = mixture_points
    sampler = Sampler(hutchinson_bundle, progress=False)
    seed = int(np.random.default_rng().integers(2**32))
    err = sampler.log_likelihood(x.astype(np.float32), seed=seed) - ref
    stderr = err.std(ddof=1) / math.sqrt(len(err))
    assert 0.05 < err.std() < 5  # an estimator, not the exact trace (measured sd 0.73 nats at one probe)
    assert abs(err.mean()) < 4 * stderr + 5e-3  # unbiased: 4 standard errors plus the solver's typical error


def test_probes_follow_seed_and_sample_index_not_batch(hutchinson_bundle, mixture_points):
    """Row i's probes are noise of sample first_sample + i: the same at any batch size and shard, another seed gives
    other probes. Rows agree across batch sizes to float32 rounding (ONNX Runtime rounds a mixture row by the batch
    around it: measured 2e-6 nats), far below what another probe changes (the estimator's sd, ~0.7)."""
    x = mixture_points[1].astype(np.float32)
    sampler = Sampler(hutchinson_bundle, progress=False)
    full = sampler.log_likelihood(x, seed=11)
    assert np.array_equal(full, sampler.log_likelihood(x, seed=11))
    assert np.abs(full - sampler.log_likelihood(x, seed=11, batch_size=7)).max() < 1e-4
    assert np.abs(full[5:] - sampler.log_likelihood(x[5:], seed=11, first_sample=5)).max() < 1e-4
    assert np.abs(full - sampler.log_likelihood(x, seed=12)).max() > 0.05


def _rk4_reference(model, x, logdet, t, h, directions):
    """One RK4 step of (x, per-element divergence) in float64, written from score_sde's drift -1/2 beta (x + score)
    with the Jacobian from torch.autograd.functional (no torch.func.jvp, no step module)."""
    vp = VP()

    def drift(y, tau):
        tv = torch.full((len(y),), tau, dtype=torch.float64)
        beta = vp.beta(tv).reshape(-1, *([1] * (y.dim() - 1)))
        score = -model(y, tv) / vp.sigma(tv).reshape(-1, *([1] * (y.dim() - 1)))
        return -0.5 * beta * (y + score)

    def terms(y, tau):
        per_row = []
        for b in range(len(y)):
            jac = torch.autograd.functional.jacobian(lambda z: drift(z[None], tau)[0], y[b], vectorize=True).reshape(y[b].numel(), -1)
            if directions is None:
                per_row.append(torch.diagonal(jac).reshape(y[b].shape))
            else:
                v = directions[b].reshape(-1)
                per_row.append((v * (jac @ v)).reshape(y[b].shape))
        return drift(y, tau), torch.stack(per_row)

    k1, g1 = terms(x, t)
    k2, g2 = terms(x + 0.5 * h * k1, t + 0.5 * h)
    k3, g3 = terms(x + 0.5 * h * k2, t + 0.5 * h)
    k4, g4 = terms(x + h * k3, t + h)
    return (x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)).detach(), (logdet + h / 6 * (g1 + 2 * g2 + 2 * g3 + g4)).detach()


@pytest.mark.parametrize("case", ["mixture-exact", pytest.param("unet-hutchinson", marks=pytest.mark.slow)])
def test_one_graph_call_matches_an_eager_float64_rk4_step(case, exact_bundle, tmp_path):
    """Per call: the exported step (JVPs traced batch-polymorphic) against float64 autograd at fresh random inputs
    and a fresh time. Bars: float32 arithmetic through the model (measured ~1e-6 relative on both)."""
    rng = np.random.default_rng()
    if case == "mixture-exact":
        bundle, model = exact_bundle, GaussianMixtureScore(GaussianMixture.rotated(), VPSDE())
    else:
        model = tiny_unet(seed=int(rng.integers(100)))
        bundle = export_bundle(model, tmp_path / "unet", sampler="likelihood", steps=2, value_range=(-1, 1),
                               log=lambda _: None)
    sampler = Sampler(bundle, progress=False)
    key = "likelihood"
    shape = (3, *bundle.manifest.model.sample_shape)
    t, h = float(rng.uniform(0.05, 0.8)), float(rng.uniform(0.01, 0.1))
    feed = {"x": rng.standard_normal(shape).astype(np.float32),
            "logdet": rng.standard_normal(shape).astype(np.float32),
            "t": np.full(3, t, np.float32), "t_mid": np.full(3, t + h / 2, np.float32),
            "t_next": np.full(3, t + h, np.float32), "h": np.full(3, h, np.float32)}
    probe = None
    if case == "unet-hutchinson":
        feed["probe"] = rng.standard_normal(shape).astype(np.float32)
        probe = torch.from_numpy(np.where(feed["probe"] >= 0, 1.0, -1.0))
    outs = [infer_once(sampler.runners[key], sampler.device, bundle.manifest.graphs[key], key, feed)]
    if case == "unet-hutchinson":  # OpenVINO runs a UNet's likelihood graph too (it refuses the mixture's: docs/cpu.md)
        ov = Sampler(bundle, backend="openvino", progress=False)
        outs.append(infer_once(ov.runners[key], ov.device, bundle.manifest.graphs[key], key, feed))
    model64 = model.double().eval()
    f32 = {k: float(v[0]) for k, v in feed.items() if v.ndim == 1}
    x_next, logdet_next = _rk4_reference(model64, torch.from_numpy(feed["x"]).double(),
                                         torch.from_numpy(feed["logdet"]).double(), f32["t"], f32["h"], probe)
    scale_x, scale_d = float(x_next.abs().max()), float((logdet_next - torch.from_numpy(feed["logdet"])).abs().max())
    logp = -0.5 * (x_next**2 + math.log(2 * math.pi)) + logdet_next
    for out in outs:
        assert np.abs(out["x_next"] - x_next.numpy()).max() < 1e-4 * scale_x
        assert np.abs(out["logdet_next"] - logdet_next.numpy()).max() < 1e-4 * scale_d + 1e-6
        assert np.abs(out["logp"] - logp.numpy()).max() < 1e-4 * float(logp.abs().max())


def test_likelihood_bundle_passes_parity_against_eager(hutchinson_bundle, capsys):
    """`vpsde parity` walks a likelihood program like any other (the prior draws serve as the points)."""
    seed = int(np.random.default_rng().integers(2**32))
    assert cli(["parity", str(hutchinson_bundle.root), "--against", "eager", "--num", "3", "--seed", str(seed)]) == 0
    assert "  ok" in capsys.readouterr().out
    # --quality scores samples: a likelihood bundle's log p would be scored as points (0.5.10 printed such figures)
    assert cli(["parity", str(hutchinson_bundle.root), "--against", "eager", "--num", "3", "--quality"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--quality scores sampled outputs" in captured.err and "likelihood" in captured.err


@pytest.mark.parametrize("seed", [1740735704, 3580503874])
def test_an_ill_conditioned_call_is_judged_by_its_float32_rounding_spread(hutchinson_bundle, seed):
    """These seeds reach a switch of the mixture's responsibilities (steps 14 and 7), where ONNX Runtime and eager
    float32 torch differ on logdet by 1.2e-4 and 2.4e-5, past the gain-scaled bar (both FAILed before 0.5.10, as 7
    of 200 random seeds did): float32 rounding there varies by 2.5e-4 and 1.5e-5 between inputs one ulp apart."""
    from vpsde.export.eager import EagerSide
    from vpsde.verify.parity import BackendSide, compare

    report = compare(hutchinson_bundle.manifest, EagerSide(hutchinson_bundle), BackendSide(hutchinson_bundle), num=3,
                     seed=seed, progress=False)
    assert report.passed
    judged = report.spread_judged
    assert judged, "the seed no longer reaches a call past its bar: the regression it pins is not exercised"
    for call, output in judged:
        assert call.max_abs[output] > report.call_atol[""]  # it did miss the bar
        assert call.spread[output] > report.call_atol[""]  # float32 arithmetic there varies by more than the bar


def test_batch_polymorphic_trace_refuses_a_value_that_depends_on_the_batch():
    def fn(x):
        return x * float(x.shape[0])

    with pytest.raises(RuntimeError, match="depends on the batch"):
        batch_polymorphic(fn, lambda b: (torch.randn(b, 3),))
    gm = batch_polymorphic(lambda x: x.reshape(-1) * 2, lambda b: (torch.randn(b, 3),))
    x = torch.randn(5, 3)
    assert torch.equal(gm(x), x.reshape(-1) * 2)  # the traced sizes (7 and 11 rows) became x.size(0)


def test_cli_writes_nll_and_bits_per_dim(exact_bundle, mixture_points, tmp_path, capsys):
    _, x, ref, _, _ = mixture_points
    np.save(tmp_path / "points.npy", x)
    assert cli(["likelihood", str(exact_bundle.root), "--data", str(tmp_path / "points.npy"), "--out",
                str(tmp_path / "out"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "likelihood.json").read_text())
    nll, bpd = np.array(report["nll"]), np.array(report["bpd"])
    assert report["inputs"] == len(x) and report["bits_per_dim_offset"] == 0.0
    np.testing.assert_allclose(-nll, Sampler(exact_bundle, progress=False).log_likelihood(x.astype(np.float32)),
                               rtol=0, atol=1e-5)  # the API's values (batch rounding aside: 2e-6)
    assert np.quantile(np.abs(nll + ref), 0.9) < 5e-3
    np.testing.assert_allclose(bpd, nll / (4 * math.log(2)), rtol=1e-12)
    assert "bits/dim" in capsys.readouterr().out


@pytest.mark.parametrize("data, message", [
    (lambda x: x[:, :3], "expected float32 points [N >= 1, 4], got float32 [5, 3]"),
    (lambda x: np.where(np.arange(4) == 2, np.nan, x), "NaN or Infinity"),
    (lambda x: x.astype(np.int32), "expected float32 or float64 points, or uint8 images, got dtype int32"),
    (lambda x: (x * 0).astype(np.uint8), "images need the model's value range"),
])
def test_bad_data_is_one_line_and_writes_nothing(exact_bundle, tmp_path, capsys, data, message):
    x = np.random.default_rng().standard_normal((5, 4))
    np.save(tmp_path / "bad.npy", data(x))
    out = tmp_path / "out"
    assert cli(["likelihood", str(exact_bundle.root), "--data", str(tmp_path / "bad.npy"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "bad.npy" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_tasks_do_not_mix(exact_bundle, gmm_bundle, tmp_path, capsys):
    with pytest.raises(InputError, match="computes likelihoods"):
        Sampler(exact_bundle, progress=False).sample(2)
    with pytest.raises(InputError, match="--sampler likelihood"):
        Sampler(gmm_bundle, progress=False).log_likelihood(np.ones((2, 2), np.float32))
    assert cli(["sample", str(exact_bundle.root), "--out", str(tmp_path / "s")]) == 2
    assert "vpsde likelihood" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_a_likelihood_bundle_needs_schema_3_and_sampling_bundles_stay_as_they_were(exact_bundle, gmm_bundle):
    data = json.loads((exact_bundle.root / "manifest.json").read_text())
    assert data["schema_version"] == 3 and data["sampler"]["task"] == "likelihood"
    sampling = json.loads((gmm_bundle.root / "manifest.json").read_text())
    assert sampling["schema_version"] == 2 and "task" not in sampling["sampler"]
    from vpsde.runtime.manifest import Manifest

    data["schema_version"] = 2  # an older runtime must not read it as a sampler
    with pytest.raises(BundleError, match="sampler.task.*needs schema_version >= 3"):
        Manifest.from_dict(data)


def test_dequantization_and_the_bits_per_dim_offset():
    """score_sde: bpd = nll / (D ln 2) + 7 for data scaled to [-1, 1] ("offset = 7 - inverse_scaler(-1)"), + 8 for
    [0, 1]; each pixel k lands inside its own bin [k, k + 1) / 256 of the range, by the seeded noise."""
    assert bits_per_dim(np.zeros(1), 10, (-1.0, 1.0), True)[0] == 7.0
    assert bits_per_dim(np.zeros(1), 10, (0.0, 1.0), True)[0] == 8.0
    assert bits_per_dim(np.full(1, 10 * math.log(2)), 10, None, False)[0] == 1.0
    pixels = np.random.default_rng().integers(0, 256, (6, 1, 4, 4)).astype(np.uint8)
    x = dequantize(pixels, (-1.0, 1.0), 3, 0, "philox4x32-10/box-muller/v1")
    k, bins = (x.astype(np.float64) + 1) / 2 * 256, pixels.astype(np.int64)
    slack = 1e-4  # x is rounded once to float32: 256 * 2^-24 of a bin
    assert (k >= bins - slack).all() and (k <= bins + 1 + slack).all() and np.unique(k - bins).size > 50
    again = dequantize(pixels[2:], (-1.0, 1.0), 3, 2, "philox4x32-10/box-muller/v1")
    assert np.array_equal(x[2:], again)  # per sample index
    assert not np.array_equal(x, dequantize(pixels, (-1.0, 1.0), 4, 0, "philox4x32-10/box-muller/v1"))


def test_the_jvp_trace_drops_the_convolutions_of_zero_weight_tangents():
    """jvp(conv) traces as conv(x_t, W) + conv(x, 0) + ...: the zero-weight convolutions go (half the network's
    tangent convolutions), and the graph computes the same bits as the trace that keeps them (x + 0 = x)."""
    from torch.func import jvp
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch._decomp import core_aten_decompositions

    torch.manual_seed(int(np.random.default_rng().integers(2**31)))
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.SiLU(),
                              torch.nn.Conv2d(4, 2, 1)).eval()

    def step(x, v):
        return jvp(net, (x,), (v,))

    def convolutions(gm):
        return sum(n.target is torch.ops.aten.convolution.default for n in gm.graph.nodes)

    inputs = (torch.randn(7, 2, 5, 5), torch.randn(7, 2, 5, 5))
    with torch.no_grad():
        kept = make_fx(step, decomposition_table=core_aten_decompositions())(*inputs)
        lean = batch_polymorphic(step, lambda b: (torch.randn(b, 2, 5, 5), torch.randn(b, 2, 5, 5)))
        assert (convolutions(kept), convolutions(lean)) == (6, 4)  # 2 + 2 x 2 tangent convolutions, then 2 + 2
        for want, got in zip(kept(*inputs), lean(*inputs)):
            assert torch.isfinite(got).all() and torch.equal(got, want)


def test_plain_group_norm_and_its_forward_derivative_equal_torchs():
    """The likelihood trace writes GroupNorm out in plain ops (export/likelihood.py): in float64 on fresh inputs
    (mean far from 0, as activations can be) its values and its JVP equal nn.GroupNorm's to 1e-12, and the traced
    step holds no native_group_norm (the rewrite is in effect)."""
    from torch.func import jvp

    from vpsde.export.likelihood import PlainGroupNorm

    rng = np.random.default_rng()
    torch.manual_seed(int(rng.integers(2**31)))
    for shape, groups in (((3, 16, 8, 8), 4), ((2, 6, 5), 3), ((2, 8, 2, 3, 4), 8)):
        norm = torch.nn.GroupNorm(groups, shape[1], eps=1e-6).double()
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
        torch.nn.init.uniform_(norm.bias, -1.0, 1.0)
        x = torch.randn(shape, dtype=torch.float64) * 3 + 5
        v = torch.randn(shape, dtype=torch.float64)
        with torch.no_grad():
            want = jvp(norm, (x,), (v,))
            with PlainGroupNorm():
                got = jvp(norm, (x,), (v,))
        for a, b in zip(got, want):
            assert torch.isfinite(a).all() and float((a - b).abs().max()) < 1e-12 * float(b.abs().max())
    from vpsde.export.likelihood import LikelihoodStep
    from vpsde.models.base import TimeLabelAdapter

    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.GroupNorm(2, 4),
                              torch.nn.Conv2d(4, 2, 1)).eval()
    step = LikelihoodStep(TimeLabelAdapter(lambda x, label: net(x), (2, 5, 5)), VPSDE()).eval()

    def inputs(b):
        return (torch.randn(b, 2, 5, 5), torch.zeros(b, 2, 5, 5), *(torch.full((b,), t) for t in (0.3, 0.35, 0.4, 0.1)),
                torch.randn(b, 2, 5, 5))

    with torch.no_grad():
        traced = batch_polymorphic(step, inputs)
    targets = {n.target for n in traced.graph.nodes}
    assert torch.ops.aten.convolution.default in targets and torch.ops.aten.native_group_norm.default not in targets
