"""The TensorRT runner's host-side logic, run on CPU against a *simulated* CUDA runtime and TensorRT runtime.

This is not GPU verification (that is tests/test_gpu_tensorrt.py, which needs a GPU). It exercises every line of
runtime/tensorrt/runner.py and cuda.py that does not need real hardware: engine selection and integrity checks on
real cached TensorRT-for-RTX engines, device buffers addressed by pointer, pinned staging uploads, read-backs,
tensor addresses and input shapes set per binding, CUDA-graph capture and replay, and the batch-profile check.

The simulation: "device memory" is host memory (ctypes buffers, addressed by integer pointers); copies are
memmoves; an "engine" runs its bundle graph with ONNX Runtime (CPU) on the arrays at the addresses the runner set;
a stream in capture mode records each enqueue with its addresses instead of running it, and a graph launch
replays the records. So the simulated backend must reproduce the ONNX Runtime CPU samples bit for bit: any
difference is a bookkeeping bug in the runner (a wrong address, shape, parity or upload).
"""

from __future__ import annotations

import ctypes
import enum
import types

import numpy as np
import onnxruntime as ort
import pytest

from vpsde.export import VPSDE, export_bundle, load_model
from vpsde.runtime import InputError, Sampler
from vpsde.runtime.errors import BackendUnavailable
from vpsde.runtime.tensorrt import cuda as cuda_mod
from vpsde.runtime.tensorrt import runner as runner_mod
from vpsde.runtime.tensorrt.build import BatchProfile
from vpsde.runtime.tensorrt.cache import build_cached, cached_keys
from vpsde.runtime.tensorrt.flavor import Flavor, load_flavor

try:
    REAL_FLAVOR = load_flavor("rtx")
except BackendUnavailable as e:
    pytest.skip(f"needs TensorRT for RTX to build the cached engines ({e})", allow_module_level=True)


class FakeCudart:
    """The cuda.bindings.runtime calls cuda.py makes, on host memory."""

    class cudaError_t(enum.Enum):
        cudaSuccess = 0
        cudaErrorNoDevice = 100

    class cudaMemcpyKind(enum.Enum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStreamCaptureMode(enum.Enum):
        cudaStreamCaptureModeThreadLocal = 1

    cudaStreamNonBlocking = 1
    cudaEventDisableTiming = 2

    def __init__(self) -> None:
        self.memory: dict[int, ctypes.Array] = {}
        self.streams: dict[int, dict] = {}
        self.counts = {"memcpy": 0, "graph_launch": 0, "capture": 0}
        ok = self.cudaError_t.cudaSuccess
        self.ok = ok

    def _alloc(self, n):
        buf = (ctypes.c_byte * n)()
        self.memory[ctypes.addressof(buf)] = buf
        return self.ok, ctypes.addressof(buf)

    cudaMalloc = cudaMallocHost = _alloc

    def cudaFree(self, ptr):
        self.memory.pop(ptr, None)
        return (self.ok,)

    cudaFreeHost = cudaFree

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        assert dst in self.memory and src in self.memory, "copy between unknown pointers"
        ctypes.memmove(dst, src, n)
        self.counts["memcpy"] += 1
        return (self.ok,)

    def cudaStreamCreateWithFlags(self, flags):
        handle = 1000 + len(self.streams)
        self.streams[handle] = {"capturing": None}
        return self.ok, handle

    def cudaStreamSynchronize(self, stream):
        return (self.ok,)

    def cudaEventCreateWithFlags(self, flags):
        return self.ok, object()

    def cudaEventRecord(self, event, stream):
        return (self.ok,)

    def cudaEventSynchronize(self, event):
        return (self.ok,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.streams[stream]["capturing"] = []
        self.counts["capture"] += 1
        return (self.ok,)

    def cudaStreamEndCapture(self, stream):
        graph, self.streams[stream]["capturing"] = self.streams[stream]["capturing"], None
        return self.ok, graph

    def cudaGraphInstantiate(self, graph, flags):
        return self.ok, list(graph)

    def cudaGraphLaunch(self, executable, stream):
        self.counts["graph_launch"] += 1
        for run in executable:
            run()
        return (self.ok,)

    def cudaGraphExecDestroy(self, _):
        return (self.ok,)

    cudaGraphDestroy = cudaGraphExecDestroy

    def cudaGetErrorString(self, err):
        return self.ok, err.name.encode()


class FakeContext:
    def __init__(self, engine, cudart) -> None:
        self.engine, self.cudart = engine, cudart
        self.addresses, self.shapes = {}, {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = int(ptr)
        return True

    def is_stream_capturable(self, stream):
        return True

    def execute_async_v3(self, stream):
        addresses, shapes = dict(self.addresses), dict(self.shapes)
        run = lambda: self.engine.run(addresses, shapes)  # noqa: E731
        capture = self.cudart.streams[stream]["capturing"]
        if capture is not None:
            capture.append(run)
        else:
            run()
        return True


class FakeEngine:
    """Runs the bundle graph with ONNX Runtime (CPU) on the arrays at the tensors' addresses."""

    def __init__(self, onnx_path, cudart) -> None:
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.cudart = cudart
        self.num_io_tensors = len(self.inputs) + len(self.outputs)

    def get_tensor_name(self, i):
        return (self.inputs + self.outputs)[i]

    def create_execution_context(self):
        return FakeContext(self, self.cudart)

    def _array(self, ptr, shape):
        assert ptr in self.cudart.memory, "tensor address is not a device allocation"
        n = int(np.prod(shape))
        return np.frombuffer((ctypes.c_float * n).from_address(ptr), dtype=np.float32).reshape(shape)

    def run(self, addresses, shapes):
        batch = shapes["x"][0]
        feed = {n: self._array(addresses[n], shapes[n]).copy() for n in self.inputs}
        for name, value in zip(self.outputs, self.session.run(self.outputs, feed)):
            assert value.shape[0] == batch
            self._array(addresses[name], value.shape)[...] = value


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt-sim")
    gmm = load_model("gmm:dim=3,components=2,seed=4", VPSDE())
    out = {
        "pc": export_bundle(gmm, root / "pc", sampler="pc", steps=8, grid="uniform", corrector_steps=2,
                            log=lambda _: None),
        "dpmpp-2m": export_bundle(gmm, root / "dpm", sampler="dpmpp-2m", steps=6, log=lambda _: None),
        "inpaint": export_bundle(gmm, root / "inpaint", sampler="inpaint", steps=7, grid="uniform", log=lambda _: None),
    }
    for b in out.values():
        for graph in b.manifest.graphs:
            build_cached(b, graph, REAL_FLAVOR, BatchProfile(1, 4, 8), ["SM86"])
    return out


@pytest.fixture
def simulated(monkeypatch, bundles):
    """Patch cuda.py's runtime, the GPU query and the TensorRT module; return the fake cudart (for counts)."""
    cudart = FakeCudart()
    plans = {}  # plan bytes -> the ONNX graph the engine was built from
    for b in bundles.values():
        for key, plan in [kp for g in b.manifest.graphs for kp in cached_keys(b, g)]:
            plans[plan.read_bytes()] = b.graph_path(key.graph)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return FakeEngine(plans[bytes(data)], cudart)

    trt = types.SimpleNamespace(Logger=type("Logger", (), {"ERROR": 0, "__init__": lambda self, level: None}),
                                Runtime=Runtime)
    monkeypatch.setattr(cuda_mod, "cudart", lambda: cudart)
    monkeypatch.setattr(runner_mod, "gpu_info", lambda index=0: cuda_mod.GpuInfo(0, "simulated", "SM86"))
    monkeypatch.setattr(runner_mod, "load_flavor", lambda which="auto": Flavor("rtx", REAL_FLAVOR.version, trt))
    return cudart


def _cond(bundle, num):
    if not bundle.manifest.sampler.conditioning:
        return None
    g = np.random.default_rng(3)
    shape = (num, *bundle.manifest.model.sample_shape)
    return {"known": g.standard_normal(shape).astype(np.float32), "mask": (g.random(shape) < 0.5).astype(np.float32)}


@pytest.mark.parametrize("case", ["pc", "dpmpp-2m", "inpaint"])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_simulated_tensorrt_loop_equals_onnxruntime(case, cuda_graph, bundles, simulated):
    b = bundles[case]
    num = 7
    cond = _cond(b, num)
    want = Sampler(b, progress=False, threads=1).sample(num, seed=11, batch_size=4, conditioning=cond)
    s = Sampler(b, backend="tensorrt", progress=False, cuda_graph=cuda_graph, noise_threads=2)
    assert s.device.name.startswith("tensorrt/cuda:0 (simulated)") and s.nan_guard == "final"
    got = s.sample(num, seed=11, batch_size=4, conditioning=cond)  # batches of 4 and 3: two workspaces
    np.testing.assert_array_equal(got, want)
    if cuda_graph:
        assert simulated.counts["capture"] > 0 and simulated.counts["graph_launch"] > 0
        # captures: at most one per (graph, parities) and batch size, however many steps
        assert simulated.counts["capture"] <= 2 * len(b.manifest.graphs) * 2 ** (1 + len(b.manifest.sampler.state))
    else:
        assert simulated.counts["capture"] == simulated.counts["graph_launch"] == 0


def test_simulated_engine_infer_and_batch_profile(bundles, simulated):
    b = bundles["dpmpp-2m"]
    s = Sampler(b, backend="tensorrt", progress=False)
    runner = s.runners["dpmpp_2m"]
    g = np.random.default_rng(0)
    feed = {spec.name: g.standard_normal(spec.shape_for(3)).astype(np.float32)
            for spec in b.manifest.graphs["dpmpp_2m"].inputs}
    from vpsde.runtime.backends.onnxruntime import OnnxRuntimeRunner, session_from_bundle

    ref = OnnxRuntimeRunner(session_from_bundle(b, "dpmpp_2m"), b, "dpmpp_2m").infer(feed)
    got = runner.infer(feed)
    assert all(np.array_equal(got[k], ref[k]) for k in ref)
    with pytest.raises(InputError, match=r"no cached engine of graph 'dpmpp_2m' takes batch 9 \(profiles 1:4:8\)"):
        s.sample(9, seed=0)
