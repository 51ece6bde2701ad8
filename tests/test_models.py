"""Models: the analytic Gaussian mixture against float64 autograd and as a sampling yardstick, the diffusers
UNet2DModel adapter, and the shipped weights' loader (with its error cases)."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from vpsde.export import VPSDE, export_bundle, load_model
from vpsde.export.sources import ModelSpecError
from vpsde.models import GaussianMixture, GaussianMixtureScore
from vpsde.models.shipped import WEIGHTS_DIR, WeightsError, load_shipped
from vpsde.runtime import Sampler


def test_gmm_eps_is_minus_std_times_exact_score(rng):
    """eps(x, t) == -std(t) * grad_x log p_t(x), the gradient by autograd of the float64 mixture density."""
    sde = VPSDE()
    mix = GaussianMixture.default(dim=3, components=4, seed=2)
    model = GaussianMixtureScore(mix, sde).double()
    x = 3 * torch.randn(64, 3, generator=rng, dtype=torch.float64)
    t = 1e-3 + torch.rand(64, generator=rng, dtype=torch.float64)
    a, s = sde.mean_coeff(t)[:, None, None], sde.std(t)[:, None, None]
    xx = x.clone().requires_grad_(True)
    # the model stores its parameters in float32: build the reference from the same rounded values
    mu, var = model.mu.double(), model.var.double()
    comp = torch.distributions.Normal(a * mu, torch.sqrt(a * a * var + s * s))  # [B, K, D]
    log_p = torch.logsumexp(model.log_w.double() + comp.log_prob(xx[:, None]).sum(-1), dim=-1)
    (score,) = torch.autograd.grad(log_p.sum(), xx)
    torch.testing.assert_close(model(x, t), -s[:, 0] * score, rtol=1e-10, atol=1e-12)


def _mmd2_permutation_pvalue(x, y, permutations=200, seed=0):
    """MMD^2 (RBF kernel, median-heuristic bandwidth, kernel diagonal excluded) and its permutation p-value:
    the tolerance is the permutation null at this sample size, not a number tuned on a run."""
    z = np.concatenate([x, y])
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    k = np.exp(-d2 / np.median(d2[d2 > 0]))
    np.fill_diagonal(k, 0.0)
    n, m = len(x), len(y)

    def stat(sign):  # sign: +1 for the first sample, -1 for the second
        a = (sign > 0) / n - (sign < 0) / m
        return a @ k @ a

    base = np.r_[np.ones(n), -np.ones(m)]
    observed = stat(base)
    rs = np.random.default_rng(seed)
    null = np.array([stat(rs.permutation(base)) for _ in range(permutations)])
    return observed, (1 + (null >= observed).sum()) / (1 + permutations)


@pytest.mark.slow
def test_gmm_samples_through_runtime_match_the_truth(tmp_path):
    """1000-step EM on ONNX Runtime vs the known mixture. Tolerances are 5 standard errors at this sample
    size: weights sqrt(w(1-w)/n), means sigma/sqrt(n_k), variances sigma^2 sqrt(2/(n_k-1)), covariances
    sigma_i sigma_j / sqrt(n_k); plus an MMD
    permutation test at p > 0.001 against fresh exact draws. A perturbed sample must fail the same checks."""
    sde = VPSDE()
    model = GaussianMixtureScore(GaussianMixture.default(), sde)
    mix = model.mixture
    bundle = export_bundle(model, tmp_path / "gmm", steps=1000, grid="uniform", sde=sde, log=lambda _: None)
    n = 20000
    x = Sampler(bundle, progress=False).sample(n, seed=7).astype(np.float64)
    assert np.isfinite(x).all()

    def check(samples):
        log_r = np.log(mix.weights) - 0.5 * (((samples[:, None] - mix.means) / mix.stds) ** 2
                                             + 2 * np.log(mix.stds)).sum(-1)
        label = log_r.argmax(1)
        fails = []
        for k, w in enumerate(mix.weights):
            frac = (label == k).mean()
            if abs(frac - w) > 5 * math.sqrt(w * (1 - w) / n):
                fails.append(f"weight {k}: {frac:.4f} vs {w:.4f}")
            xk = samples[label == k]
            nk = len(xk)
            se_mean = mix.stds[k] / math.sqrt(nk)
            if (np.abs(xk.mean(0) - mix.means[k]) > 5 * se_mean).any():
                fails.append(f"mean {k}: {xk.mean(0)} vs {mix.means[k]}")
            var = mix.stds[k] ** 2
            if (np.abs(xk.var(0, ddof=1) - var) > 5 * var * math.sqrt(2 / (nk - 1))).any():
                fails.append(f"var {k}: {xk.var(0, ddof=1)} vs {var}")
            cov = np.cov(xk, rowvar=False)  # true covariance is diagonal: off-diagonal SE = s_i s_j / sqrt(n_k)
            off = ~np.eye(mix.dim, dtype=bool)
            if (np.abs(cov[off]) > 5 * np.outer(mix.stds[k], mix.stds[k])[off] / math.sqrt(nk)).any():
                fails.append(f"covariance {k}: {cov}")
        truth, _ = mix.sample(2000, np.random.default_rng(1))
        mmd2, p = _mmd2_permutation_pvalue(samples[:2000], truth)
        if p <= 1e-3:
            fails.append(f"MMD^2 {mmd2:.3g}, permutation p = {p:.4f}")
        return fails

    assert check(x) == []
    assert check(x * 1.1) != []  # negative control: a 10% scale error is caught


def test_diffusers_unet_adapter_parity(diffusers_unet_dir, tmp_path, rng):
    """A tiny random UNet2DModel, saved and loaded from disk: ORT fused step vs eager <= 1e-5 at batch 1, 3."""
    from vpsde.export.steps import EulerMaruyamaStep
    from vpsde.runtime.backends.onnxruntime import OnnxRuntimeRunner, session_from_bundle

    sde = VPSDE(std_formula="diffusers")
    model = load_model(f"diffusers:{diffusers_unet_dir}", sde)
    assert model.time_label == "999t" and model.sample_shape == (1, 16, 16)
    bundle = export_bundle(model, tmp_path / "b", steps=10, sde=sde, log=lambda _: None)
    runner = OnnxRuntimeRunner(session_from_bundle(bundle, "em"), bundle, "em")
    step = EulerMaruyamaStep(model, sde)
    for batch in (1, 3):
        x, noise = torch.randn(batch, 1, 16, 16, generator=rng), torch.randn(batch, 1, 16, 16, generator=rng)
        t, dt = torch.rand(batch, generator=rng) + 1e-3, -0.01 * torch.rand(batch, generator=rng) - 1e-4
        with torch.no_grad():
            ref = step(x, t, dt, torch.sqrt(-dt), noise)
        out = runner.infer({"x": x.numpy(), "t": t.numpy(), "dt": dt.numpy(), "sqrt_neg_dt": torch.sqrt(-dt).numpy(),
                            "noise": noise.numpy()})
        assert np.abs(out["x_next"] - ref[0].numpy()).max() <= 1e-5
        assert np.abs(out["x_mean"] - ref[1].numpy()).max() <= 1e-5


def test_conv_random_spec_names_its_options():
    model = load_model("conv-random:seed=2,hidden=4", VPSDE())
    assert model.sample_shape == (1, 8, 8) and model.net.inp.out_channels == 4
    with pytest.raises(ModelSpecError, match="width"):
        load_model("conv-random:width=4", VPSDE())


def test_diffusers_spec_without_a_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSpecError, match="neither a diffusers UNet directory"):
        load_model(f"diffusers:{tmp_path}", VPSDE())


def _pipeline(root, unet_dir, **scheduler):
    """A pipeline root: unet/ (a copy of the tiny UNet) and scheduler/scheduler_config.json."""
    import json
    import shutil

    shutil.copytree(unet_dir, root / "unet")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return root


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_diffusers_pipeline_root_and_its_prediction_type(diffusers_unet_dir, tmp_path, prediction):
    """A pipeline root is accepted (its unet/), and a v- or x0-predicting UNet samples eps: checked against the
    conversion done here in float64 from the raw UNet's output (alpha, sigma of the VP-SDE written out)."""
    from diffusers import UNet2DModel

    root = _pipeline(tmp_path / "pipe", diffusers_unet_dir, _class_name="DDPMScheduler", beta_schedule="linear",
                     beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000, prediction_type=prediction)
    model = load_model(f"diffusers:{root}", VPSDE())
    raw = UNet2DModel.from_pretrained(diffusers_unet_dir, local_files_only=True).eval()
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31)))
    x, t = torch.randn(3, 1, 16, 16, generator=g), torch.rand(3, generator=g) * 0.9 + 0.05
    with torch.no_grad():
        got = model(x, t).double()
        out = raw(x, 999.0 * t, return_dict=False)[0].double()
    tt = t.double()[:, None, None, None]
    log_alpha = -0.25 * tt**2 * (20.0 - 0.1) - 0.5 * tt * 0.1
    alpha, sigma = torch.exp(log_alpha), torch.sqrt(1 - torch.exp(2 * log_alpha))
    want = {"epsilon": out, "v_prediction": sigma * x.double() + alpha * out,
            "sample": (x.double() - alpha * out) / sigma}[prediction]
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
    if prediction != "epsilon":  # and the conversion is not a no-op
        assert (got - out).abs().max() > 1e-2


@pytest.mark.parametrize("scheduler, message", [
    ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule 'squaredcos_cap_v2' is not the VP-SDE"),
    ({"beta_schedule": "scaled_linear"}, "beta_schedule 'scaled_linear'"),
    ({"beta_schedule": "linear", "trained_betas": [0.1, 0.2]}, "with trained_betas"),
    ({"beta_schedule": "linear", "beta_end": 0.012}, "pass --beta-max 12"),
    ({"prediction_type": "flow"}, "prediction_type 'flow'"),
    ({"_class_name": "ScoreSdeVpScheduler", "beta_max": 10.0}, "pass --beta-max 10"),
])
def test_diffusers_schedules_that_are_not_this_vp_sde_are_refused(diffusers_unet_dir, tmp_path, scheduler, message):
    root = _pipeline(tmp_path / "pipe", diffusers_unet_dir, **scheduler)
    with pytest.raises(ModelSpecError, match=message) as e:
        load_model(f"diffusers:{root}", VPSDE())
    assert "scheduler_config.json" in str(e.value) and "\n" not in str(e.value)
    if scheduler.get("beta_max") == 10.0:  # under the SDE it was trained with it loads (from unet/ too)
        assert load_model(f"diffusers:{root}/unet", VPSDE(beta_max=10.0)).sample_shape == (1, 16, 16)


# -- shipped weights -------------------------------------------------------------------------------------------
def test_shipped_model_loads_and_predicts_noise(rng):
    """The shipped model is trained: at t = 0.5 its noise prediction on noised real digits beats predicting 0
    by a wide margin (DSM loss well below 1, the loss of eps = 0)."""
    from vpsde.models.digits_data import train_heldout_split

    model = load_shipped()
    assert model.time_label == "999t" and model.sample_shape == (1, 16, 16) and model.weights_sha256
    _, (x_ho, _) = train_heldout_split()
    x0 = torch.from_numpy(x_ho[:128])
    sde = VPSDE()
    t = torch.full((128,), 0.5)
    z = torch.randn(x0.shape, generator=rng)
    with torch.no_grad():
        eps = model(sde.mean_coeff(t)[:, None, None, None] * x0 + sde.std(t)[:, None, None, None] * z, t)
    assert ((eps - z) ** 2).mean() < 0.2


@pytest.fixture
def weights_copy(tmp_path):
    for f in ("digits16.json", "digits16.safetensors"):
        shutil.copy(WEIGHTS_DIR / f, tmp_path / f)
    return tmp_path / "digits16.json"


def _edit_json(path, edit):
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_weights_for_another_architecture(weights_copy):
    _edit_json(weights_copy, lambda m: m["unet"].update(channels=16))
    with pytest.raises(WeightsError, match=r"digits16\.safetensors: does not match the architecture"):
        load_shipped(weights_copy)


def test_missing_config_key(weights_copy):
    _edit_json(weights_copy, lambda m: m.pop("time_label"))
    with pytest.raises(WeightsError, match=r"digits16\.json: missing config key\(s\) \['time_label'\]"):
        load_shipped(weights_copy)


def test_non_finite_weight(weights_copy):
    import hashlib

    from safetensors.torch import load, save

    wpath = weights_copy.parent / "digits16.safetensors"
    state = load(wpath.read_bytes())
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    blob = save(state)
    wpath.write_bytes(blob)
    _edit_json(weights_copy, lambda m: m.update(weights_sha256=hashlib.sha256(blob).hexdigest()))
    with pytest.raises(WeightsError, match=f"non-finite values in \\['{key}'\\]"):
        load_shipped(weights_copy)


def test_tampered_weights_fail_sha256(weights_copy):
    with open(weights_copy.parent / "digits16.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(WeightsError, match="sha256"):
        load_shipped(weights_copy)


def test_quick_training_is_reproducible_and_loadable(tmp_path):
    """The training script's quick mode, twice with one seed: identical weights; they load as a ScoreModel."""
    from vpsde.models.train_digits import QUICK_CONFIG, train

    for i in range(2):
        train(tmp_path / f"run{i}", steps=8, batch=16, lr=1e-3, ema_decay=0.9, seed=3, config=QUICK_CONFIG,
              warmup=2, progress=False)
    a = json.loads((tmp_path / "run0" / "digits16.json").read_text())
    b = json.loads((tmp_path / "run1" / "digits16.json").read_text())
    assert a["weights_sha256"] == b["weights_sha256"]
    model = load_shipped(tmp_path / "run0" / "digits16.json")
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 1, 16, 16), torch.rand(2))).all()
