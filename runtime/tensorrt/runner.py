"""Running cached TensorRT engines on the GPU: the loader picks, checks and deserializes each graph's engine from
the bundle's cache; the runner binds device buffers and enqueues ``execute_async_v3`` on one CUDA stream
(optionally captured once per binding as a CUDA graph and replayed); the device uploads host noise through
pinned staging buffers, asynchronously, so the host can draw the next call's noise while the GPU works.

Tested on CPU against a simulated CUDA and TensorRT runtime (``tests/test_tensorrt_simulated.py``) and on a GPU by
``tests/test_gpu_tensorrt.py``; docs/gpu.md records what has run on which machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from vpsde.runtime.bundle import Bundle
from vpsde.runtime.errors import BackendUnavailable, BundleError, InputError
from vpsde.runtime.loop import OpenBackend, infer_once
from vpsde.runtime.tensorrt.cache import ENGINE_DIR, EngineKey, cached_keys, check_engine
from vpsde.runtime.tensorrt.cuda import DeviceArray, Event, PinnedArray, Stream, copy_async, gpu_info
from vpsde.runtime.tensorrt.flavor import Flavor, load_flavor


class TrtDevice:
    """GPU buffers (:class:`DeviceArray`) on one stream. Uploads go through two pinned staging buffers per
    destination, used in turn: the host fills one while the previous copy from the other may still run. Staging
    and read-back buffers belong to their device buffer (a freed address can come back for another buffer)."""

    on_host = False

    def __init__(self, stream: Stream, gpu_name: str) -> None:
        self.stream = stream
        self.name = f"tensorrt/cuda:0 ({gpu_name})"
        self.runtime: Any = None  # the TensorRT runtime: engines must not outlive it

    def empty(self, shape: tuple[int, ...], dtype: str) -> DeviceArray:
        return DeviceArray(shape, dtype)

    def upload(self, dst: DeviceArray, src: np.ndarray) -> None:
        if src.shape != dst.shape or src.dtype != dst.dtype:
            raise InputError(f"upload of {src.dtype} {src.shape} into a {dst.dtype} {dst.shape} buffer")
        ring = dst.staging
        if ring is None:
            ring = dst.staging = [0, (PinnedArray(dst.shape, dst.dtype.name), Event()),
                                  (PinnedArray(dst.shape, dst.dtype.name), Event())]
        slot = ring[1 + ring[0]]
        ring[0] = 1 - ring[0]
        pinned, done = slot
        done.synchronize()  # the copy that last read this staging buffer has finished
        np.copyto(pinned.array, src)
        copy_async(dst.ptr, pinned.ptr, dst.nbytes, True, self.stream)
        done.record(self.stream)

    def peek(self, src: DeviceArray) -> np.ndarray:
        out = src.readback
        if out is None:
            out = src.readback = PinnedArray(src.shape, src.dtype.name)
        copy_async(out.ptr, src.ptr, src.nbytes, False, self.stream)
        self.stream.synchronize()
        return out.array


@dataclass
class _Engine:
    key: EngineKey
    engine: Any
    context: Any
    batch_range: tuple[int, int]


@dataclass
class TrtRunner:
    """One graph's engines (one per cached batch profile) on ``device``'s stream."""

    graph: str
    spec: Any
    engines: list[_Engine]
    device: TrtDevice
    cuda_graph: bool = False

    def _engine_for(self, batch: int) -> _Engine:
        for e in sorted(self.engines, key=lambda e: e.batch_range[1]):
            if e.batch_range[0] <= batch <= e.batch_range[1]:
                return e
        have = ", ".join(e.key.profile for e in self.engines)
        raise InputError(f"no cached engine of graph {self.graph!r} takes batch {batch} (profiles {have}); run "
                         f"`vpsde build BUNDLE --batch 1:{batch}:{batch}` or sample with --batch-size in range")

    def bind(self, buffers: Mapping[str, DeviceArray]) -> Callable[[], None]:
        batch = buffers["x"].shape[0]
        e = self._engine_for(batch)
        ctx, stream = e.context, self.device.stream
        inputs = [s.name for s in self.spec.inputs]
        names = inputs + [s.name for s in self.spec.outputs]

        def enqueue() -> None:
            for name in inputs:
                ctx.set_input_shape(name, buffers[name].shape)
            for name in names:
                ctx.set_tensor_address(name, buffers[name].ptr)
            if not ctx.execute_async_v3(stream.handle):
                raise BundleError(f"TensorRT execute_async_v3 failed for graph {self.graph!r} (batch {batch})")

        if not self.cuda_graph:
            return enqueue
        enqueue()  # TensorRT needs one call outside capture first; its result is the same as the replay's
        if not ctx.is_stream_capturable(stream.handle):
            raise BackendUnavailable(f"graph {self.graph!r}: this TensorRT engine cannot be captured as a CUDA "
                                     "graph; sample without --cuda-graph")
        graph = stream.capture(lambda: ctx.execute_async_v3(stream.handle))
        # the launch holds the graph and the buffers its captured kernels read and write
        return lambda _alive=buffers: graph.launch(stream)

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One checked call on host arrays (tests and tools): inputs by name -> host copies of the outputs."""
        return infer_once(self, self.device, self.spec, self.graph, feed)


def select_engines(bundle: Bundle, graph: str, flavor: Flavor, target: str) -> list[tuple[EngineKey, Any]]:
    """The cached engines of ``graph`` usable here: same graph sha256, flavour, version and precision, built for
    ``target`` (e.g. "SM89"). BundleError saying what the cache holds when there is none."""
    spec, precision = bundle.manifest.graphs[graph], bundle.manifest.model.precision
    found = cached_keys(bundle, graph)
    usable = [(k, p) for k, p in found if k.graph_sha256 == spec.sha256 and k.flavor == flavor.name
              and k.version == flavor.version and k.precision == precision and target in k.targets]
    if not usable:
        held = "; ".join(f"{k.flavor} {k.version} for {','.join(k.targets)}, batch {k.profile}"
                         + ("" if k.graph_sha256 == spec.sha256 else " (another graph version)") for k, _ in found)
        raise BundleError(f"{bundle.root / ENGINE_DIR}: no engine of graph {graph!r} for {target} with "
                          f"{flavor.name} {flavor.version} (cache holds: {held or 'nothing'}); run `vpsde build "
                          f"{bundle.root}`" + (f" --target-cc {target}" if flavor.targets_named_cc else ""))
    return usable


def open_engines(bundle: Bundle, cuda_graph: bool = False, flavor: str = "auto") -> OpenBackend:
    """Loader: check, deserialize and open every graph's cached engines for this GPU."""
    gpu = gpu_info()
    fl = load_flavor(flavor)
    trt = fl.trt
    logger = trt.Logger(trt.Logger.ERROR)
    runtime = trt.Runtime(logger)
    device = TrtDevice(Stream(), gpu.name)
    device.runtime = runtime
    runners = {}
    for graph, spec in bundle.manifest.graphs.items():
        engines = []
        for key, plan in select_engines(bundle, graph, fl, gpu.compute_capability):
            engine = runtime.deserialize_cuda_engine(check_engine(plan, key))
            if engine is None:
                raise BundleError(f"{plan}: {fl.name} {fl.version} could not deserialize the engine on "
                                  f"{gpu.name} ({gpu.compute_capability}); run `vpsde build {bundle.root} --force`")
            io = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
            want = {s.name for s in (*spec.inputs, *spec.outputs)}
            if io != want:
                raise BundleError(f"{plan}: engine tensors {sorted(io)} do not match 'graphs.{graph}' "
                                  f"inputs and outputs {sorted(want)}")
            lo, hi = (int(n) for n in key.profile.split(":")[::2])
            engines.append(_Engine(key, engine, engine.create_execution_context(), (lo, hi)))
        runners[graph] = TrtRunner(graph, spec, engines, device, cuda_graph)
    return OpenBackend(device, runners)
