"""`vpsde parity`: per-call and whole-trajectory comparison of a bundle against a reference.

The checks are built to fail: identical sides must give exactly 0; a graph whose eps is scaled by 1.001 from
t < 0.5 on must be flagged at the first step with t < 0.5 (not before); fp16 vs fp32 must give non-zero,
bounded figures; a float64 eager reference must agree with ONNX Runtime to float32 rounding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vpsde.cli.main import main as cli
from vpsde.export import export_bundle, load_model
from vpsde.models.base import ScoreModel
from vpsde.models.sde import VPSDE
from vpsde.runtime import Bundle
from vpsde.export.samplers import DEFINITIONS, SAMPLERS
from vpsde.verify.parity import BackendSide, compare

pytest.importorskip("polygraphy", reason="vpsde[parity] (polygraphy) not installed")

GMM = "gmm:dim=4,components=5,full=1"


class ScaledLate(ScoreModel):
    """A model's eps times ``factor`` where t < ``below``: a regression that appears mid-trajectory."""

    time_label = "t"

    def __init__(self, inner: ScoreModel, factor: float, below: float) -> None:
        super().__init__()
        self.inner, self.factor, self.below = inner, factor, below
        self.name, self.sample_shape = inner.name, inner.sample_shape

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale = torch.where(t < self.below, torch.full_like(t, self.factor), torch.ones_like(t))
        return self.inner(x, t) * scale.view(-1, *[1] * (x.dim() - 1))


@pytest.fixture(scope="module")
def gmm_em(tmp_path_factory):
    return export_bundle(load_model(GMM, VPSDE()), tmp_path_factory.mktemp("parity") / "gmm", steps=40,
                         grid="uniform", log=lambda _: None)


def test_identical_sides_give_exactly_zero(gmm_em):
    report = compare(gmm_em.manifest, BackendSide(gmm_em, name="a"), BackendSide(gmm_em, name="b"), num=6, seed=3,
                     progress=False)
    assert report.passed
    assert report.final_max_abs == 0.0 and report.final_rel_l2 == 0.0
    assert all(s.max_abs == 0.0 for s in report.steps) and len(report.steps) == 40
    assert report.required_call_atol == 0.0 and len(report.calls) == 40


def test_eager_float64_reference_agrees_to_float32_rounding(gmm_em):
    from vpsde.export.eager import EagerSide

    report = compare(gmm_em.manifest, EagerSide(gmm_em, dtype=torch.float64), BackendSide(gmm_em), num=8, seed=1,
                     progress=False)
    assert report.passed
    assert 0 < report.final_rel_l2 < 1e-5  # float32 graphs vs float64 arithmetic: rounding, never exact
    assert report.required_call_atol < 1e-5


def test_a_perturbed_graph_is_caught_where_it_diverges(gmm_em, tmp_path):
    sde = VPSDE()
    bad = export_bundle(ScaledLate(load_model(GMM, sde), 1.001, below=0.5), tmp_path / "bad", steps=40,
                        grid="uniform", sde=sde, log=lambda _: None)
    report = compare(bad.manifest, BackendSide(gmm_em, name="good"), BackendSide(bad, name="bad"), num=8, seed=0,
                     progress=False)
    t = np.asarray(gmm_em.manifest.schedule["t"])
    first_late = int(np.argmax(t < 0.5))
    assert 0 < first_late < 40
    assert not report.passed
    assert report.first_failing_call.step == first_late
    assert all(c.passed for c in report.calls[:first_late])
    assert all(s.max_abs == 0.0 for s in report.steps[:first_late])  # bit-equal before the change
    assert report.steps[first_late].max_abs > 0
    assert report.captured[0] == first_late  # --polygraphy-cmd saves the failing call


def test_cli_writes_report_and_exits_1_on_divergence(gmm_em, tmp_path, capsys):
    sde = VPSDE()
    bad = export_bundle(ScaledLate(load_model(GMM, sde), 1.001, below=2.0), tmp_path / "bad", steps=40,
                        grid="uniform", sde=sde, log=lambda _: None)
    out = tmp_path / "report"
    assert cli(["parity", str(bad.root), "--against", str(gmm_em.root), "--report", str(out), "--polygraphy-cmd"]) == 1
    text = capsys.readouterr().out
    assert "FAIL: call at step 0 (em)" in text
    assert "polygraphy run" in text and "--load-inputs" in text and str(bad.root / "em.onnx") in text
    data = json.loads((out / "report.json").read_text())
    (comp,) = data["comparisons"]
    assert comp["passed"] is False and comp["per_call"]["first_failing"]["step"] == 0
    assert len(comp["steps"]) == 40 and (out / "error_vs_step.png").stat().st_size > 1000
    from polygraphy.json import load_json

    (feed,) = load_json(str(out / "polygraphy_inputs.json"))
    assert sorted(feed) == sorted(s.name for s in bad.manifest.graphs["em"].inputs)
    assert feed["x"].shape == (4, 4) and np.isfinite(feed["x"]).all()


def test_fp16_against_fp32_is_bounded_on_the_shipped_model(tmp_path, capsys):
    sde = VPSDE()
    model = load_model("digits", sde)
    fp32 = export_bundle(model, tmp_path / "fp32", steps=30, grid="uniform", sde=sde, value_range=(-1, 1),
                         log=lambda _: None)
    fp16 = export_bundle(model, tmp_path / "fp16", steps=30, grid="uniform", sde=sde, value_range=(-1, 1),
                         precision="fp16", log=lambda _: None)
    out = tmp_path / "r"
    assert cli(["parity", str(fp16.root), "--against", str(fp32.root), "--num", "4", "--report", str(out),
                "--quality"]) == 0
    data = json.loads((out / "report.json").read_text())
    comp = data["comparisons"][0]
    quality = data["quality"]  # the digits classifier yardstick on both sides (4 samples: noise, but computed)
    assert len(quality) == 2 and all(0 < q["mean_confidence"] <= 1 and q["fd_to_train"] > 0 for q in quality.values())
    assert "mostly sampling noise" in capsys.readouterr().out
    assert 1e-6 < comp["final"]["rel_l2"] < 1e-2  # fp16 rounding: visible, bounded
    assert comp["final"]["atol"] == 1e-2  # fp16 defaults chosen from the lower precision
    assert (out / "samples.png").exists()


def test_few_step_fp16_against_fp32_scales_its_bars_by_the_eager_gain(digits, tmp_path, capsys):
    """A correct 4-step DPM-Solver++(2M) fp16 bundle FAILed against its fp32 sibling before 0.5.9 (x_next off by
    5e-3 at step 0, fp16 bar 1e-3, gain about 8): the eager model now measures each call's gain for two bundles too.
    The wider bar is not blind: eps x 1.02 from t < 0.5 on still fails."""
    kwargs = dict(sampler="dpmpp-2m", steps=4, value_range=(-1, 1), log=lambda _: None)
    fp32 = export_bundle(digits, tmp_path / "fp32", **kwargs)
    fp16 = export_bundle(digits, tmp_path / "fp16", precision="fp16", **kwargs)
    out = tmp_path / "r"
    assert cli(["parity", str(fp16.root), "--against", str(fp32.root), "--num", "3", "--report", str(out),
                "--no-progress"]) == 0, capsys.readouterr().out
    calls = json.loads((out / "report.json").read_text())["comparisons"][0]["calls"]
    assert calls[0]["gain"]["x_next"] > 2, calls[0]
    assert cli(["parity", str(fp16.root), "--against", str(fp32.root), "--num", "3", "--no-gains",
                "--no-progress"]) == 1  # the table's bars alone: what it did before
    late = ScaledLate(digits, 1.02, below=0.5)
    late.weights_sha256 = digits.weights_sha256  # the right weights around a wrong graph
    bad = export_bundle(late, tmp_path / "bad", precision="fp16", **kwargs)
    capsys.readouterr()
    assert cli(["parity", str(bad.root), "--against", str(fp32.root), "--model", "digits", "--num", "3",
                "--no-progress"]) == 1
    first_late = int(np.argmax(np.asarray(bad.manifest.schedule["t"]) < 0.5))
    assert f"FAIL: call at step {first_late} (dpmpp_2m)" in capsys.readouterr().out


def test_fp16_network_output_carried_as_state_is_held_to_fp16s_rounding(digits, tmp_path, capsys):
    """iPNDM carries eps itself as state (output ``e``, gain 1): the shipped network in fp16 is up to 2.6e-3 off
    float32 at small t (800 samples), and the fp16 bar of 1e-3 FAILed every correct fp16 iPNDM bundle against its
    fp32 sibling (0.5.13: 4e-3). eps x 1.02 below t = 0.5 still fails at the first step there."""
    kwargs = dict(sampler="ipndm", steps=10, value_range=(-1, 1), log=lambda _: None)
    fp32 = export_bundle(digits, tmp_path / "fp32", **kwargs)
    fp16 = export_bundle(digits, tmp_path / "fp16", precision="fp16", **kwargs)
    seed = str(np.random.default_rng().integers(2**32))
    argv = ["--against", str(fp32.root), "--num", "8", "--seed", seed, "--no-progress", "--report", str(tmp_path / "r")]
    assert cli(["parity", str(fp16.root), *argv]) == 0, capsys.readouterr().out
    calls = json.loads((tmp_path / "r" / "report.json").read_text())["comparisons"][0]["calls"]
    assert max(c["max_abs"]["e"] for c in calls) > 1e-3  # past the old bar: fp16's rounding, seen
    late = ScaledLate(digits, 1.02, below=0.5)
    late.weights_sha256 = digits.weights_sha256
    bad = export_bundle(late, tmp_path / "bad", precision="fp16", **kwargs)
    capsys.readouterr()
    assert cli(["parity", str(bad.root), *argv[:-2], "--model", "digits"]) == 1
    first_late = int(np.argmax(np.asarray(bad.manifest.schedule["t"]) < 0.5))
    assert f"FAIL: call at step {first_late} (ipndm)" in capsys.readouterr().out


def test_eager_against_ort_on_the_shipped_model(tmp_path, capsys):
    bundle = export_bundle(load_model("digits", VPSDE()), tmp_path / "d", steps=10, grid="uniform",
                           log=lambda _: None)
    assert cli(["parity", str(bundle.root), "--against", "eager", "--num", "2"]) == 0
    assert "onnxruntime[fp32]" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--against", "eager", "--polygraphy-cmd"], "give --report"),
    (["--against", "eager", "--model", "nope"], "unknown model 'nope'"),
    (["--against", "eager", "--model", "unet-random:channels=9"], "--model 'unet-random:channels=9': num_channels (9)"),
    (["--against", "eager", "--model", "gmm:dim=2"], "sample_shape"),
    (["--against", "backend:nope"], "unknown backend"),
])
def test_bad_requests_are_clear_errors(gmm_em, argv, message, capsys):
    assert cli(["parity", str(gmm_em.root), *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_backend_that_cannot_open_is_reported_and_the_others_are_compared(gmm_em, tmp_path, capsys):
    """`--backends onnxruntime,tensorrt` where TensorRT cannot open (no GPU here; no engines built on a GPU): the
    onnxruntime side is still compared and passes, the tensorrt line says why it was not run, report.json records
    it, and the exit status is 1 (not every side verified). With no side that opens, the error is the command's
    (exit 2); a misspelled name is refused before anything runs."""
    out = tmp_path / "report"
    assert cli(["parity", str(gmm_em.root), "--against", "eager", "--backends", "onnxruntime,tensorrt",
                "--no-progress", "--report", str(out)]) == 1
    text = capsys.readouterr().out
    (ort_row,) = [line for line in text.splitlines() if line.startswith("onnxruntime[fp32]")]
    assert ort_row.endswith("  ok")
    (not_run,) = [line for line in text.splitlines() if line.startswith("tensorrt")]
    assert not_run.startswith("tensorrt: not run: ") and len(not_run) > 40
    data = json.loads((out / "report.json").read_text())
    assert len(data["comparisons"]) == 1 and data["comparisons"][0]["passed"] is True
    assert list(data["not_run"]) == ["tensorrt"] and data["not_run"]["tensorrt"] in not_run

    assert cli(["parity", str(gmm_em.root), "--against", "eager", "--backends", "tensorrt", "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("vpsde parity: error: ")
    assert cli(["parity", str(gmm_em.root), "--against", "eager", "--backends", "onnxruntime,openvin"]) == 2
    assert "unknown backend 'openvin'" in capsys.readouterr().err


def test_bundles_of_different_programs_are_refused(gmm_em, tmp_path, capsys):
    other = export_bundle(load_model(GMM, VPSDE()), tmp_path / "o", steps=41, grid="uniform", log=lambda _: None)
    assert cli(["parity", str(gmm_em.root), "--against", str(other.root)]) == 2
    err = capsys.readouterr().err
    assert "field sampler.steps differs" in err and str(other.root / "manifest.json") in err


def test_quality_on_the_exact_mixture_is_scored_on_both_sides(gmm_em, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli(["parity", str(gmm_em.root), "--against", "eager64", "--num", "300", "--quality", "--report",
                str(out)]) == 0
    quality = json.loads((out / "report.json").read_text())["quality"]
    (ref_q, test_q) = quality.values()
    assert set(ref_q) >= {"sw1", "weight_error", "component_fd"}
    for key in ("sw1", "component_fd"):  # same noise, float32 vs float64 steps: the same figures to 3 digits
        assert np.isfinite(test_q[key]) and abs(test_q[key] - ref_q[key]) <= 1e-3 * abs(ref_q[key]) + 1e-9


def test_nan_never_passes(gmm_em, tmp_path):
    class NaNLate(ScaledLate):
        def forward(self, x, t):
            return super().forward(x, t) * torch.where(t < 0.3, torch.full_like(t, float("nan")), torch.ones_like(t))[:, None]

    sde = VPSDE()
    bad = export_bundle(NaNLate(load_model(GMM, sde), 1.0, below=2.0), tmp_path / "nan", steps=40, grid="uniform",
                        sde=sde, log=lambda _: None)
    report = compare(bad.manifest, BackendSide(gmm_em), BackendSide(bad), num=2, progress=False, call_atol=1e9,
                     call_rtol=1e9, atol=1e9, rtol=1e9)
    assert not report.passed and not report.final_passed
    assert report.first_failing_call.step == int(np.argmax(np.asarray(gmm_em.manifest.schedule["t"]) < 0.3))


def test_same_model_check_uses_the_weights_hash(tmp_path):
    """A bundle of the digits model cannot be compared against another model's eager steps."""
    from vpsde.export.eager import EagerSide
    from vpsde.runtime.errors import InputError

    bundle = export_bundle(load_model("digits", VPSDE()), tmp_path / "d", steps=5, grid="uniform", log=lambda _: None)
    with pytest.raises(InputError, match="weights"):
        EagerSide(Bundle.load(bundle.root), "unet-random:channels=8")


TUNABLE = [s for s in SAMPLERS if "tuned" in DEFINITIONS[s].grids]


@pytest.mark.parametrize("sampler", TUNABLE)
def test_a_bundle_on_the_tuned_grid_passes_parity_against_eager(sampler, tmp_path, capsys):
    """`vpsde parity --against eager` on a bundle exported with --grid tuned died with a traceback (0.5.10): the
    eager rebuild asked for the tuning's edges, which only the bundle's schedule holds. Each sampler that takes the
    grid, with its final jump to t = 0 where it has one, must pass with the defaults (fresh seed)."""
    from vpsde.export.tuning import Tuning

    denoise_final = DEFINITIONS[sampler].denoise_final
    bundle = export_bundle(load_model("gmm:dim=3,components=2,seed=4", VPSDE()), tmp_path / sampler, sampler=sampler,
                           steps=5, grid="tuned", tuning=Tuning(samples=16, seed=3), denoise_final=denoise_final,
                           log=lambda _: None)
    seed = int(np.random.default_rng().integers(1 << 31))
    assert cli(["parity", str(bundle.root), "--against", "eager", "--seed", str(seed), "--no-progress"]) == 0, seed
    assert "onnxruntime[fp32]" in capsys.readouterr().out


def test_the_eager_reference_refuses_a_schedule_its_rebuild_does_not_give(gmm_em):
    """The eager side rebuilds the sampler from sampler.params and grid: a schedule that differs from what that
    gives (here one t moved by 1e-3 after loading) is named, not compared against another schedule."""
    from vpsde.export.eager import EagerSide
    from vpsde.runtime.errors import InputError

    bundle = Bundle.load(gmm_em.root)
    EagerSide(bundle)  # the bundle as exported is accepted
    bundle.manifest.schedule["t"][3] += 1e-3
    with pytest.raises(InputError, match=r"field 'schedule.t' is not what sampler 'em' on the 'uniform' grid"):
        EagerSide(bundle)


CONDITIONED = {"inpaint": ("digits", {"known", "mask"}), "colorize": ("gmm:dim=3,components=2,seed=4", {"known"})}


@pytest.mark.slow
@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s not in CONDITIONED and s != "likelihood"])  # likelihood: test_likelihood.py
def test_every_samplers_correct_bundle_passes_parity_against_eager_with_the_defaults(sampler, digits, tmp_path,
                                                                                     capsys):
    """`vpsde parity --against eager` said FAIL on correct fp32 DPM-Solver++ bundles (0.4.1: the x0 output had the
    default bar): each sampler's digits bundle, default grid, must pass with the defaults (fresh seed)."""
    steps = 24 if sampler in ("pc", "ancestral") else 6  # their default (diffusers) grid needs N > beta_max
    bundle = export_bundle(digits, tmp_path / sampler, sampler=sampler, steps=steps, value_range=(-1, 1),
                           log=lambda _: None)
    seed = int(np.random.default_rng().integers(2**32))
    assert cli(["parity", str(bundle.root), "--against", "eager", "--num", "3", "--seed", str(seed)]) == 0, \
        capsys.readouterr().out
    assert "  ok" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("sampler", list(CONDITIONED))
def test_conditioned_samplers_pass_parity_against_eager_with_the_defaults(sampler, tmp_path):
    from vpsde.export.eager import EagerSide

    spec, inputs = CONDITIONED[sampler]
    bundle = export_bundle(load_model(spec, VPSDE()), tmp_path / sampler, sampler=sampler, steps=6,
                           log=lambda _: None)
    rng = np.random.default_rng()
    shape = (3, *bundle.manifest.model.sample_shape)
    cond = {"known": rng.uniform(-1, 1, shape).astype(np.float32),
            "mask": (rng.random(shape) < 0.5).astype(np.float32)}
    report = compare(bundle.manifest, EagerSide(bundle), BackendSide(bundle), num=3, seed=int(rng.integers(2**32)),
                     conditioning={k: cond[k] for k in inputs}, progress=False)
    assert report.passed, (report.first_failing_call, report.final_rel_l2)


def test_eager_gains_are_the_steps_derivative_in_eps(digits, tmp_path):
    """EagerSide.gains of an Euler-Maruyama call is d x_next / d eps = beta(t) |dt| / sigma(t) (drift = -beta x / 2 +
    beta eps / sigma), written here from the VP-SDE in float64; within 1e-3 (a float32 difference over a 2^-10 shift
    of every network output)."""
    from vpsde.export.eager import EagerSide

    bundle = export_bundle(digits, tmp_path / "em", steps=10, grid="uniform", log=lambda _: None)
    m = bundle.manifest
    side = EagerSide(Bundle.load(bundle.root))
    rng = np.random.default_rng()
    shape = (3, *m.model.sample_shape)
    for i in range(m.sampler.steps):
        feed = {name: rng.standard_normal(shape).astype(np.float32) for name in ("x", "noise")}
        feed |= {k: np.full(3, m.schedule[k][i], np.float32) for k in ("t", "dt", "sqrt_neg_dt")}
        t, dt = float(m.schedule["t"][i]), float(m.schedule["dt"][i])
        beta = m.sde.beta_min + t * (m.sde.beta_max - m.sde.beta_min)
        sigma = np.sqrt(-np.expm1(2 * (-0.25 * t**2 * (m.sde.beta_max - m.sde.beta_min) - 0.5 * t * m.sde.beta_min)))
        gains = side.gains("em", feed, side("em", feed))
        for name in ("x_next", "x_mean"):
            assert gains[name] == pytest.approx(beta * -dt / sigma, rel=1e-3), (i, name, gains)


@pytest.mark.slow
def test_coarse_steps_of_a_deeper_network_pass_against_eager(tmp_path):
    """A 4-step DPM-Solver++(2M) bundle of a small DDPM++ FAILed per call against eager (x_next off by 3e-5, bar
    1e-5) while its trajectory agreed to 5e-7 relative: its first step multiplies the network's rounding by about
    10. Per-call bars scale by the eager side's measured gain, so it passes; the same bundle with eps x 1.001 from
    t < 0.5 on still fails (eps x 1.0001 passes since 0.5.10: at its first late step the random network's float32
    rounding varies by 1.5e-4 between inputs one ulp apart, and the change moves x_next by 2.6e-4 there)."""
    from vpsde.export.eager import EagerSide
    from vpsde.models.score_sde import ScoreSdeConfig

    config = ScoreSdeConfig(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16)
    spec = f"score_sde-random:config={json.dumps(config.to_dict()).replace(' ', '')},seed=1"
    model = load_model(spec, VPSDE())
    seed = int(np.random.default_rng().integers(2**32))
    good = export_bundle(model, tmp_path / "good", sampler="dpmpp-2m", steps=4, log=lambda _: None)
    report = compare(good.manifest, EagerSide(good, spec), BackendSide(good), num=3, seed=seed, progress=False)
    assert report.passed, (report.first_failing_call, report.final_rel_l2)
    first = report.calls[0]
    assert first.gain["x_next"] > 5 and first.max_abs["x_next"] > 1e-5  # what the flat bar refused
    late = ScaledLate(model, 1.001, below=0.5)
    late.weights_sha256 = model.weights_sha256
    bad = export_bundle(late, tmp_path / "bad", sampler="dpmpp-2m", steps=4, log=lambda _: None)
    report = compare(bad.manifest, EagerSide(bad, spec), BackendSide(bad), num=3, seed=seed, progress=False)
    assert not report.passed and report.first_failing_call.step > 0


@pytest.mark.slow
def test_a_perturbed_dpmpp_bundle_still_fails_against_eager_and_names_the_output(digits, tmp_path, capsys):
    """The x0 bar is wider, not blind: eps x 1.001 from t < 0.5 on fails, naming the call and its outputs."""
    late = ScaledLate(digits, 1.001, below=0.5)
    late.weights_sha256 = digits.weights_sha256  # the right weights around a wrong graph
    bad = export_bundle(late, tmp_path / "bad", sampler="dpmpp-2m", steps=10, value_range=(-1, 1),
                        log=lambda _: None)
    assert cli(["parity", str(bad.root), "--against", "eager", "--model", "digits", "--num", "3"]) == 1
    out = capsys.readouterr().out
    first_late = int(np.argmax(np.asarray(bad.manifest.schedule["t"]) < 0.5))
    assert f"FAIL: call at step {first_late} (dpmpp_2m), output " in out and "x_next" in out, out


class OffBy:
    """A reference that is ``BackendSide`` plus ``offset`` on x_next: a backend that is wrong."""

    name = "off by"

    def __init__(self, bundle, offset: float) -> None:
        self.side, self.offset = BackendSide(bundle), offset

    def __call__(self, key, feed):
        out = self.side(key, feed)
        return {**out, "x_next": out["x_next"] + np.float32(self.offset)}


def test_a_call_past_its_bar_is_rejudged_by_its_rounding_spread_which_excuses_no_error(gmm_em):
    """A reference 5e-5 off (5x the fp32 bar), the eager model measuring: every call is re-judged, its float32
    rounding spread on the well-conditioned mixture EM step is tiny, so every call still fails."""
    from vpsde.export.eager import EagerSide

    report = compare(gmm_em.manifest, OffBy(gmm_em, 5e-5), BackendSide(gmm_em), num=4, gain_meter=EagerSide(gmm_em),
                     seed=int(np.random.default_rng().integers(2**32)), progress=False)
    assert [call.step for call, output in report.spread_judged if output == "x_next"] == list(range(40))
    assert all(0 < call.spread["x_next"] < 2e-6 and call.failed_outputs == ["x_next"] for call in report.calls)
    assert not report.passed


def test_against_float64_a_float32_side_carries_the_programs_own_float32_error(tmp_path):
    """diffusers' std sqrt(1 - exp(2 lmc)) (the EM bundle's, for bit parity with diffusers) cancels in float32 near
    t = eps: at the last of 12 steps eager float32 itself is ~6e-4 off float64 on x_next, 60x the fp32 bar, and
    ONNX Runtime with it. Against eager64 that error is the float32 side's to carry (parity FAILed the correct
    bundle); a side 5e-5 off everywhere still fails wherever float32 errs less than that."""
    from vpsde.export.eager import EagerSide

    bundle = export_bundle(load_model("digits", VPSDE(std_formula="diffusers")), tmp_path / "em", steps=12,
                           grid="diffusers", log=lambda _: None)
    reference, seed = EagerSide(bundle, dtype=torch.float64), int(np.random.default_rng().integers(2**32))
    report = compare(bundle.manifest, reference, BackendSide(bundle), num=3, seed=seed, progress=False)
    last = report.calls[-1]
    assert report.passed, report.first_failing_call
    assert last.max_abs["x_next"] > 10 * report.call_atol[""] * last.atol_scale("x_next")  # far past its fixed bar
    assert last.float32_error["x_next"] > 1e-4 and last.spread["x_next"] < 1e-5  # carried, not the spread's doing
    off = compare(bundle.manifest, reference, OffBy(bundle, 5e-5), num=3, seed=seed, progress=False)
    assert {c.step for c in off.calls if not c.passed} >= set(range(11)) and not off.passed


def test_a_float32_error_that_is_not_finite_excuses_nothing():
    from vpsde.verify.parity import CallRecord, _judge_by_spread

    ref = np.random.default_rng().standard_normal((4, 4)).astype(np.float32)
    record = CallRecord(0, "em", {"x_next": 1.0}, {"x_next": 0.0}, {"x_next": 0.0}, False, ["x_next"])
    carried = {"x_next": np.full(ref.shape, np.inf)}
    _judge_by_spread(record, {"x_next": 0.0}, {"x_next": ref}, {"x_next": ref + 1}, {"": 1e-5}, {"": 1e-5}, carried)
    assert not record.passed and record.failed_outputs == ["x_next"]
    carried = {"x_next": np.full(ref.shape, 1.5)}
    _judge_by_spread(record, {"x_next": 0.0}, {"x_next": ref}, {"x_next": ref + 1}, {"": 1e-5}, {"": 1e-5}, carried)
    assert record.passed  # the same difference within a finite carried error of 1.5


def test_a_wrong_shape_is_never_excused_by_the_spread():
    """numpy would broadcast [4, 1] against [4, 4]; the re-judge must not: the output stays failed."""
    from vpsde.verify.parity import CallRecord, _judge_by_spread

    ref = np.random.default_rng().standard_normal((4, 4)).astype(np.float32)
    record = CallRecord(0, "em", {"x_next": 0.0}, {"x_next": 0.0}, {"x_next": 0.0}, False, ["x_next"])
    _judge_by_spread(record, {"x_next": 1e3}, {"x_next": ref}, {"x_next": ref[:, :1]}, {"": 1e-5}, {"": 1e-5})
    assert not record.passed and record.failed_outputs == ["x_next"]
    _judge_by_spread(record, {"x_next": 1e3}, {"x_next": ref}, {"x_next": ref + 1}, {"": 1e-5}, {"": 1e-5})
    assert record.passed  # the same spread does excuse a same-shaped difference within 8 x 1e3


def test_a_zero_bar_is_never_widened_by_the_spread():
    """--call-atol 0 asks for equality (the gain cannot widen it: 0 x G = 0); the spread must not either."""
    from vpsde.verify.parity import CallRecord, _judge_by_spread

    ref = np.random.default_rng().standard_normal((4, 4)).astype(np.float32)
    record = CallRecord(0, "em", {"x_next": 1e-7}, {"x_next": 0.0}, {"x_next": 0.0}, False, ["x_next"])
    _judge_by_spread(record, {"x_next": 1e-3}, {"x_next": ref}, {"x_next": np.nextafter(ref, np.inf)}, {"": 0.0},
                     {"": 0.0})
    assert not record.passed and record.failed_outputs == ["x_next"]


def test_the_rounding_spread_sees_float32_arithmetic_not_the_inputs_sensitivity():
    """(x - 1) x 1e6 near x = 1 moves by 0.06 to 0.12 per ulp of x, but float32 computes it to its last bit: spread
    under 3e-7. sin(1e7 x) near x = 1 rounds 1e7 x to an integer in float32, differently one ulp of x away (1.2 apart):
    its error moves by up to 1 (it is the argument's rounding, seen through sin)."""
    from vpsde.verify.parity import rounding_spread

    class Side:
        def __init__(self, f):
            self.f = f

        def rounding_error(self, key, feed):
            x = feed["x"]
            return {"y": self.f(x).astype(np.float64) - self.f(x.astype(np.float64))}

    rng = np.random.default_rng()
    x = (1 + rng.integers(-20, 20, 64) * 2.0**-23).astype(np.float32)
    cancels = rounding_spread(Side(lambda v: (v - v.dtype.type(1)) * v.dtype.type(1e6)), "k", {"x": x}, rng)
    assert cancels["y"] < 3e-7
    rounded = rounding_spread(Side(lambda v: np.sin(v * v.dtype.type(1e7))), "k", {"x": x}, rng)
    assert 0.1 < rounded["y"] <= 2.0


def test_per_output_call_tolerances_from_the_command_line(gmm_em, tmp_path, capsys):
    """polygraphy's convention: NAME:VALUE items and a bare default; a lone number bars every output."""
    out = tmp_path / "r"
    assert cli(["parity", str(gmm_em.root), "--against", "eager64", "--num", "2", "--report", str(out), "--no-gains",
                "--call-atol", "x_mean:0.5", "0", "--call-rtol", "0"]) == 1  # x_next at 0: float32 vs float64 fails
    text = capsys.readouterr().out
    assert "output x_next" in text and "x_mean" not in text.split("FAIL")[1]
    per_call = json.loads((out / "report.json").read_text())["comparisons"][0]["per_call"]
    assert per_call["atol"][""] == 0.0 and per_call["atol"]["x_mean"] == 0.5 and per_call["rtol"] == {"": 0.0}
    assert cli(["parity", str(gmm_em.root), "--against", "eager64", "--num", "2", "--call-atol", "1e-3"]) == 0
    for bad in (["--call-atol", "x0:nan"], ["--call-atol", "-1"], ["--call-atol", ":1"], ["--atol", "x0:1"]):
        with pytest.raises(SystemExit) as stop:  # argparse's own exit: usage and one error line
            cli(["parity", str(gmm_em.root), "--against", "eager", *bad])
        assert stop.value.code == 2 and bad[1] in capsys.readouterr().err


def test_the_tolerance_table_covers_every_precision_in_order():
    from vpsde.runtime.manifest import PRECISIONS
    from vpsde.verify.tolerances import TOLERANCES, lower_precision

    assert tuple(TOLERANCES) == PRECISIONS
    assert lower_precision("fp32", "int8", "fp16") == "int8" and lower_precision("bf16", "fp16") == "bf16"



def test_parity_of_an_inpainting_bundle_from_the_command_line(tmp_path, capsys):
    """--known/--mask as for sample (.npy here); a conditioned bundle without them, or with the wrong shape, is
    one line."""
    bundle = export_bundle(load_model("gmm:dim=4,components=2,seed=3", VPSDE()), tmp_path / "inpaint",
                           sampler="inpaint", steps=12, log=lambda _: None)
    rng = np.random.default_rng()
    np.save(tmp_path / "known.npy", rng.uniform(-1, 1, 4).astype(np.float32))
    np.save(tmp_path / "mask.npy", np.array([1, 0, 1, 0], np.float32))
    np.save(tmp_path / "known3.npy", rng.uniform(-1, 1, (3, 4)).astype(np.float32))
    known, mask = ["--known", str(tmp_path / "known.npy")], ["--mask", str(tmp_path / "mask.npy")]
    argv = ["parity", str(bundle.root), "--against", "eager64", "--num", "4", "--no-progress"]
    assert cli([*argv, *known, *mask]) == 0
    assert "  ok" in capsys.readouterr().out
    assert cli(argv) == 2
    assert "pass --known and --mask" in capsys.readouterr().err
    assert cli([*argv, "--known", str(tmp_path / "known3.npy"), *mask]) == 2
    assert "conditioning input 'known': expected shape [4] or [4, 4], got [3, 4]" in capsys.readouterr().err
