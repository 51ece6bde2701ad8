"""GPU parity through ONNX Runtime's CUDA execution provider (needs onnxruntime-gpu and an NVIDIA GPU; skipped
with the reason otherwise). Bars (DESIGN): fp32 graph call vs the eager float32 step on CPU, max abs <= 1e-4;
a 200-step trajectory vs the CPU runtime, relative L2 <= 1e-3; fp16 graph eps-equivalent error <= 1e-2 (the
real half-precision arithmetic that CPU CI cannot see, see test_precision.py).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from vpsde.export import VPSDE, export_bundle, load_model
from vpsde.export.steps import EulerMaruyamaStep
from vpsde.runtime import Sampler
from vpsde.runtime.backends.onnxruntime import OnnxRuntimeRunner, session_from_bundle

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                       reason="no CUDAExecutionProvider in this onnxruntime (needs onnxruntime-gpu and an NVIDIA GPU)"),
]


@pytest.fixture(scope="module")
def digits():
    return load_model("digits", VPSDE())


@pytest.fixture(scope="module")
def bundles(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    return {p: export_bundle(digits, root / p, steps=200, grid="uniform", precision=p, log=lambda _: None)
            for p in ("fp32", "fp16")}


@pytest.mark.parametrize("precision, bound", [("fp32", 1e-4), ("fp16", 1e-2)])
def test_cuda_step_vs_eager(bundles, digits, precision, bound, rng):
    b, sde = bundles[precision], VPSDE()
    m = b.manifest
    runner = OnnxRuntimeRunner(session_from_bundle(b, "em", device="cuda"), b, "em")
    step = EulerMaruyamaStep(digits, sde)
    for i in (0, 100, len(m.schedule["t"]) - 1):
        t = m.schedule["t"][i]
        x = torch.randn((8, 1, 16, 16), generator=rng)
        feed = {"x": x.numpy(), "t": np.full(8, t, np.float32), "noise": torch.randn(x.shape, generator=rng).numpy(),
                **{k: np.full(8, m.schedule[k][i], np.float32) for k in ("dt", "sqrt_neg_dt")}}
        got = runner.infer(feed)
        with torch.no_grad():
            ref = step(*(torch.from_numpy(feed[k]) for k in step.input_names))[1].numpy()
        assert np.isfinite(got["x_mean"]).all()
        err = np.abs(got["x_mean"] - ref).max()
        if precision == "fp16":  # judge eps: x_mean carries it scaled by beta |dt| / std
            err /= float(sde.beta(torch.tensor(t)) * -m.schedule["dt"][i] / sde.std(torch.tensor(t)))
        assert err <= bound, f"step {i}: {err:.2e}"


def test_cuda_trajectory_vs_cpu(bundles):
    b = bundles["fp32"]
    cpu = Sampler(b, progress=False).sample(16, seed=0)
    gpu = Sampler(b, progress=False, device="cuda").sample(16, seed=0)
    rel = np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu)
    print(f"\n200-step EM, ORT CUDA EP vs ORT CPU: relative L2 = {rel:.2e}")
    assert np.isfinite(gpu).all() and rel <= 1e-3


def test_cuda_device_loop_with_state_vs_cpu(digits, tmp_path):
    """DPM-Solver++ (x and x0 ping-pong on the GPU) against the CPU loop, same graph."""
    b = export_bundle(digits, tmp_path / "dpm", sampler="dpmpp-2m", steps=20, log=lambda _: None)
    cpu = Sampler(b, progress=False).sample(16, seed=3)
    gpu = Sampler(b, progress=False, device="cuda").sample(16, seed=3)
    rel = np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu)
    print(f"\n20-step DPM-Solver++(2M), ORT CUDA EP vs ORT CPU: relative L2 = {rel:.2e}")
    assert np.isfinite(gpu).all() and rel <= 1e-3


def test_cuda_graph_replay_equals_plain_loop(bundles):
    """ORT's CUDA-graph replay runs the same kernels on the same buffers: bit for bit the plain loop."""
    b = bundles["fp32"]
    plain = Sampler(b, progress=False, device="cuda").sample(16, seed=1)
    replay = Sampler(b, progress=False, device="cuda", cuda_graph=True).sample(16, seed=1)
    assert np.isfinite(replay).all() and np.array_equal(plain, replay)


@pytest.mark.skipif("TensorrtExecutionProvider" not in ort.get_available_providers(),
                    reason="this onnxruntime has no TensorrtExecutionProvider")
def test_ort_tensorrt_ep_trajectory_vs_cpu(bundles):
    b = bundles["fp32"]
    s = Sampler(b, backend="onnxruntime-trt", progress=False)
    if "TensorrtExecutionProvider" not in s.runners["em"].session.get_providers():
        pytest.skip("ONNX Runtime could not load TensorRT (libnvinfer) and fell back to CUDA")
    cpu = Sampler(b, progress=False).sample(16, seed=0)
    gpu = s.sample(16, seed=0)
    rel = np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu)
    print(f"\n200-step EM, ORT TensorRT EP vs ORT CPU: relative L2 = {rel:.2e}")
    assert np.isfinite(gpu).all() and rel <= 1e-3
