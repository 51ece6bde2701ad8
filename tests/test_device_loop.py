"""The device loop (runtime/loop.py): x and state ping-pong between two buffers, bindings made once, schedule
values uploaded once per step, conditioning once per batch. Checked bit for bit against a naive host loop written
here from the manifest (one checked ``infer`` call per graph call, fresh arrays every call), on ONNX Runtime's
CPU provider, whose OrtValue / IOBinding / update_inplace path is the one the CUDA provider takes with GPU buffers.
Bit equality is the bar: both run the same graphs on the same float32 inputs, so any difference is a plumbing
bug (a stale buffer, a wrong parity, a skipped upload).
"""

from __future__ import annotations

import numpy as np
import pytest

from vpsde.export import VPSDE, export_bundle, load_model
from vpsde.runtime import Sampler
from vpsde.runtime.backends.onnxruntime import OnnxRuntimeRunner, session_from_bundle
from vpsde.runtime.errors import NonFiniteError
from vpsde.runtime.loop import DeviceLoop
from vpsde.runtime.noise import make_noise

CASES = {  # sampler, steps, grid, options: together they cover repeats, two graphs, state, conditioning, 2 NFE/step
    "pc-2-correctors": ("pc", 12, "uniform", {"corrector_steps": 2}),
    "dpmpp-2m": ("dpmpp-2m", 9, "logsnr", {}),
    "ode-heun": ("ode-heun", 7, "logsnr", {}),
    "inpaint": ("inpaint", 11, "uniform", {}),
    "ancestral": ("ancestral", 10, "uniform", {}),
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    model = load_model("gmm:dim=4,components=3,seed=2", VPSDE())
    root = tmp_path_factory.mktemp("loop")
    return {case: export_bundle(model, root / case, sampler=s, steps=n, grid=g, log=lambda _: None, **o)
            for case, (s, n, g, o) in CASES.items()}


def naive_loop(bundle, num: int, seed: int, first_sample: int, cond: dict) -> np.ndarray:
    """The manifest's program, one fresh feed dict per call."""
    m = bundle.manifest
    runners = {k: OnnxRuntimeRunner(session_from_bundle(bundle, k, threads=1), bundle, k) for k in m.graphs}
    shape = tuple(m.model.sample_shape)
    noise = make_noise(m.noise.generator, seed)
    x = noise(0, first_sample, num, shape)
    state = {s.input: np.zeros((num, *shape), np.float32) for s in m.sampler.state}
    call = 1
    for i in range(m.sampler.steps):
        for pc in m.sampler.program:
            runner = runners[pc.graph]
            for _ in range(pc.repeat):
                feed = {}
                for spec in runner.spec.inputs:  # noise calls in the manifest's noise.inputs order
                    role = m.input_role(spec.name)
                    if role == "schedule":
                        feed[spec.name] = np.full(num, m.schedule[spec.name][i], np.float32)
                    elif role == "state":
                        feed[spec.name] = state[spec.name]
                    elif role == "conditioning":
                        feed[spec.name] = cond[spec.name]
                    elif spec.name == "x":
                        feed["x"] = x
                for name in m.noise.inputs:
                    if name in {s.name for s in runner.spec.inputs}:
                        feed[name] = noise(call, first_sample, num, shape)
                        call += 1
                out = runner.infer(feed)
                x = out["x_next"]
                for s in m.sampler.state:
                    if s.output in out:
                        state[s.input] = out[s.output]
    return out[m.sampler.final]


def _cond(bundle, num, seed=5):
    if not bundle.manifest.sampler.conditioning:
        return {}
    g = np.random.default_rng(seed)
    shape = (num, *bundle.manifest.model.sample_shape)
    return {"known": g.standard_normal(shape).astype(np.float32), "mask": (g.random(shape) < 0.5).astype(np.float32)}


@pytest.mark.parametrize("case", list(CASES))
def test_device_loop_equals_naive_loop(case, bundles):
    b = bundles[case]
    num, seed, first = 7, 20 + len(case), 3
    cond = _cond(b, num)
    want = naive_loop(b, num, seed, first, cond)
    got = Sampler(b, progress=False, threads=1).sample(num, seed=seed, first_sample=first, conditioning=cond or None)
    assert np.isfinite(got).all()
    assert np.array_equal(got, want), f"max abs {np.abs(got - want).max():.3e}"


@pytest.mark.parametrize("case", ["pc-2-correctors", "dpmpp-2m"])
def test_batches_reuse_buffers_and_bindings(case, bundles):
    """Batches of 3, 3, 2: equal to one batch (Philox per sample); one binding per (graph, parities), made once."""
    b = bundles[case]
    s = Sampler(b, progress=False, threads=1)
    binds = []
    for key, runner in s.runners.items():
        orig = runner.bind
        runner.bind = lambda buffers, _orig=orig, _key=key: (binds.append(_key), _orig(buffers))[1]
    one = Sampler(b, progress=False, threads=1).sample(8, seed=4)
    np.testing.assert_array_equal(s.sample(8, seed=4, batch_size=3), one)
    rolling = 1 + len(b.manifest.sampler.state)
    per_size = {key: binds.count(key) for key in s.runners}
    # two batch sizes (3 and 2): at most 2^rolling parities per graph and size, whatever the number of steps
    assert all(0 < n <= 2 * 2 ** rolling for n in per_size.values()), per_size
    assert len(binds) < b.manifest.sampler.steps


def test_callback_sees_x_after_every_step(bundles):
    b = bundles["dpmpp-2m"]
    seen = []
    out = Sampler(b, progress=False).sample(5, seed=1, callback=lambda i, x: seen.append((i, x)))
    assert [i for i, _ in seen] == list(range(b.manifest.sampler.steps))
    np.testing.assert_array_equal(seen[-1][1], out)  # dpmpp-2m's final output is x_next of the last call
    assert not np.array_equal(seen[-2][1], seen[-1][1])


def test_nan_guard_modes(tmp_path, monkeypatch):
    """A model whose output turns NaN for samples with x_0 > 1 once t < 0.5: "step" names the first bad step,
    "final" names the samples, "off" lets the NaN through."""
    import torch

    from vpsde.models.base import ScoreModel

    class NaNForSome(ScoreModel):
        sample_shape = (2,)
        name = "nan-for-some"

        def forward(self, x, t):
            bad = (x[:, :1] > 1.0) & (t[:, None] < 0.5)
            return torch.where(bad, torch.full_like(x, float("nan")), 0.1 * x)

    b = export_bundle(NaNForSome(), tmp_path / "b", steps=20, grid="uniform", sde=VPSDE(), log=lambda _: None)
    # uniform grid t_i = 1 - i (1 - 1e-3) / 20: t_10 = 0.5005, t_11 = 0.4505 is the first below 0.5
    with pytest.raises(NonFiniteError, match=r"at step 11 \(of 0..19, t = 0\.4505\d*\), in samples \["):
        Sampler(b, progress=False, nan_guard="step").sample(64, seed=0)
    with pytest.raises(NonFiniteError, match=r"final sample .* has NaN/Inf in samples \[.*--nan-guard step"):
        Sampler(b, progress=False, nan_guard="final").sample(64, seed=0)
    out = Sampler(b, progress=False, nan_guard="off").sample(64, seed=0)
    assert np.isnan(out).any() and np.isfinite(out).any()
    # "locate" (the CPU default) names the same step, and reads nothing back per step while all is finite
    default = Sampler(b, progress=False)
    assert default.nan_guard == "locate"
    with pytest.raises(NonFiniteError, match=r"at step 11 \(of 0..19, t = 0\.4505\d*\), in samples \["):
        default.sample(64, seed=0)
    with pytest.raises(NonFiniteError, match=r"at step 11 "):  # torch's generator draws in order: checked per step
        default.sample(64, seed=0, generator="torch")
    checks = []
    monkeypatch.setattr(DeviceLoop, "_check_finite", lambda *a: checks.append(a))
    fine = default.sample(64, seed=0, batch_size=16, stop_after_steps=10)  # before t < 0.5: finite
    assert np.isfinite(fine).all() and checks == []
    Sampler(b, progress=False, nan_guard="step").sample(16, seed=0, stop_after_steps=10)
    assert len(checks) == 10
    with pytest.raises(Exception, match="nan_guard: expected one of"):
        Sampler(b, progress=False, nan_guard="sometimes")
