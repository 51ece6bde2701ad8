"""GPU parity through ONNX Runtime's CUDA execution provider (needs onnxruntime-gpu and an NVIDIA GPU; skipped
with the reason otherwise). Bars (DESIGN): fp32 graph call vs the eager float32 step on CPU, max abs <= 1e-4;
a 200-step trajectory vs the CPU runtime, relative L2 <= 1e-3; fp16 graph eps-equivalent error <= 1e-2 (the
real half-precision arithmetic that CPU CI cannot see, see test_precision.py).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from vpsde.export import export_bundle
from vpsde.runtime import Sampler
from vpsde.runtime.backends.onnxruntime import OnnxRuntimeRunner, session_from_bundle

from conftest import em_step_errors, rel_l2

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                       reason="no CUDAExecutionProvider in this onnxruntime (needs onnxruntime-gpu and an NVIDIA GPU)"),
]


@pytest.fixture(scope="module")
def bundles(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    return {p: export_bundle(digits, root / p, steps=200, grid="uniform", precision=p, log=lambda _: None)
            for p in ("fp32", "fp16")}


@pytest.mark.parametrize("precision, bound", [("fp32", 1e-4), ("fp16", 1e-2)])
def test_cuda_step_vs_eager(bundles, digits, precision, bound, rng):
    b = bundles[precision]
    runner = OnnxRuntimeRunner(session_from_bundle(b, "em", device="cuda"), b, "em")
    errors = em_step_errors(runner, b, digits, (0, 100, len(b.manifest.schedule["t"]) - 1), rng)
    print(f"\n{precision} ORT CUDA step errors: {errors}")
    assert max(errors) <= bound


def test_cuda_trajectory_vs_cpu(bundles):
    b = bundles["fp32"]
    rel = rel_l2(Sampler(b, progress=False, device="cuda").sample(16, seed=0), Sampler(b, progress=False).sample(16, seed=0))
    print(f"\n200-step EM, ORT CUDA EP vs ORT CPU: relative L2 = {rel:.2e}")
    assert rel <= 1e-3


def test_cuda_device_loop_with_state_vs_cpu(digits, tmp_path):
    """DPM-Solver++ (x and x0 ping-pong on the GPU) against the CPU loop, same graph."""
    b = export_bundle(digits, tmp_path / "dpm", sampler="dpmpp-2m", steps=20, log=lambda _: None)
    rel = rel_l2(Sampler(b, progress=False, device="cuda").sample(16, seed=3), Sampler(b, progress=False).sample(16, seed=3))
    print(f"\n20-step DPM-Solver++(2M), ORT CUDA EP vs ORT CPU: relative L2 = {rel:.2e}")
    assert rel <= 1e-3


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
    rel = rel_l2(s.sample(16, seed=0), Sampler(b, progress=False).sample(16, seed=0))
    print(f"\n200-step EM, ORT TensorRT EP vs ORT CPU: relative L2 = {rel:.2e}")
    assert rel <= 1e-3
