"""The TensorRT backend on a GPU: engines from the bundle's cache run by the device loop (cuda-python, one stream,
pinned uploads, optional CUDA graphs). Needs an NVIDIA GPU, cuda-python and a TensorRT that targets it (full
TensorRT; or TensorRT for RTX on SM75-SM121, not Hopper); skipped with the reason otherwise.

Bars (DESIGN): fp32 engine call vs the eager float32 step, max abs <= 1e-4 (TensorRT may pick other kernels and
fuse differently, so not bit parity); a 1000-step trajectory vs the CPU runtime, relative L2 <= 1e-3; fp16 eps
error <= 1e-2; CUDA-graph replay == plain enqueue, bit for bit (same engine, same buffers).
"""

from __future__ import annotations

import numpy as np
import pytest

from vpsde.export import export_bundle
from vpsde.runtime import Sampler
from vpsde.runtime.errors import BackendUnavailable
from vpsde.runtime.tensorrt.build import BatchProfile
from vpsde.runtime.tensorrt.cache import build_cached
from vpsde.runtime.tensorrt.flavor import load_flavor

from conftest import em_step_errors, rel_l2


def _setup():
    try:
        from vpsde.runtime.tensorrt.cuda import gpu_info

        flavor, gpu = load_flavor("auto"), gpu_info()
    except BackendUnavailable as e:
        return None, str(e)
    if flavor.targets_named_cc and gpu.compute_capability not in flavor.compute_capabilities():
        return None, f"{flavor.name} {flavor.version} does not target this GPU ({gpu.name}, {gpu.compute_capability})"
    return (flavor, gpu), ""


SETUP, WHY = _setup()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SETUP is None, reason=f"no TensorRT run here: {WHY}")]
PROFILE = BatchProfile(1, 16, 16)


def _built(bundle):
    flavor, gpu = SETUP
    for graph in bundle.manifest.graphs:
        build_cached(bundle, graph, flavor, PROFILE, [gpu.compute_capability])
    return bundle


@pytest.fixture(scope="module")
def bundles(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("trt-gpu")
    return {p: _built(export_bundle(digits, root / p, steps=1000, grid="uniform", precision=p, log=lambda _: None))
            for p in ("fp32", "fp16")}


@pytest.mark.parametrize("precision, bound", [("fp32", 1e-4), ("fp16", 1e-2)])
def test_engine_step_vs_eager(bundles, digits, precision, bound, rng):
    b = bundles[precision]
    runner = Sampler(b, backend="tensorrt", progress=False).runners["em"]
    errors = em_step_errors(runner, b, digits, (0, 500, len(b.manifest.schedule["t"]) - 1), rng)
    print(f"\n{precision} TensorRT engine step errors: {errors}")
    assert max(errors) <= bound


def test_trajectory_vs_cpu(bundles):
    b = bundles["fp32"]
    rel = rel_l2(Sampler(b, backend="tensorrt", progress=False).sample(16, seed=0),
                 Sampler(b, progress=False).sample(16, seed=0))
    print(f"\n1000-step EM, TensorRT vs ORT CPU: relative L2 = {rel:.2e}")
    assert rel <= 1e-3


def test_cuda_graph_equals_plain(bundles, digits, tmp_path):
    for b in (bundles["fp32"], _built(export_bundle(digits, tmp_path / "dpm", sampler="dpmpp-2m", steps=20,
                                                    log=lambda _: None))):
        plain = Sampler(b, backend="tensorrt", progress=False).sample(16, seed=2)
        replay = Sampler(b, backend="tensorrt", progress=False, cuda_graph=True).sample(16, seed=2)
        assert np.isfinite(replay).all() and np.array_equal(plain, replay)
