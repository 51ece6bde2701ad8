"""The few CUDA runtime calls the TensorRT backend makes, through cuda-python (``cuda.bindings.runtime``; no torch).

Every call is checked: a failure raises :class:`CudaError` naming the call and CUDA's own message, and "no GPU"
(no driver, no device) raises :class:`~vpsde.runtime.errors.BackendUnavailable` saying so plainly.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import numpy as np

from vpsde.runtime.errors import BackendUnavailable, VpsdeError

INSTALL_HINT = ("pip install cuda-python (or 'vpsde[tensorrt]' / 'vpsde[tensorrt-rtx]', which carry cuda-bindings), "
                "on a machine with an NVIDIA GPU and driver")
_NO_GPU = ("cudaErrorInsufficientDriver", "cudaErrorNoDevice", "cudaErrorInitializationError")


class CudaError(VpsdeError):
    """A CUDA runtime call failed."""


def cudart() -> ModuleType:
    try:
        from cuda.bindings import runtime
    except ImportError:
        raise BackendUnavailable(f"the tensorrt backend needs cuda-python ({INSTALL_HINT})") from None
    return runtime


def check(result: tuple, call: str) -> Any:
    """``result`` of a cuda-python call, ``(error, *values)`` -> the values (one value unwrapped)."""
    rt = cudart()
    err, *values = result
    if err != rt.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        message = rt.cudaGetErrorString(err)[1].decode(errors="replace")
        if name in _NO_GPU:
            raise BackendUnavailable(f"no usable NVIDIA GPU here: {call} failed with {name} ({message}); the "
                                     "tensorrt backend and --device cuda need an NVIDIA GPU and its driver")
        raise CudaError(f"{call} failed: {name} ({message})")
    return values[0] if len(values) == 1 else tuple(values)


def _release(call: str, handle: Any) -> None:
    """Free a CUDA resource from ``__del__``: never raises (at interpreter exit CUDA may already be gone)."""
    try:
        getattr(cudart(), call)(handle)
    except Exception:
        pass


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "SM90"


def gpu_info(index: int = 0) -> GpuInfo:
    """The GPU ``index``'s name and compute capability; BackendUnavailable when there is none."""
    rt = cudart()
    count = check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if count <= index:
        raise BackendUnavailable(f"no NVIDIA GPU {index} here (CUDA sees {count})")
    props = check(rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(index, name, f"SM{props.major}{props.minor}")


class Stream:
    """A non-blocking CUDA stream; ``handle`` is the integer TensorRT's ``execute_async_v3`` takes."""

    def __init__(self) -> None:
        rt = cudart()
        self._stream = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self.handle = int(self._stream)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def capture(self, enqueue: Callable[[], None]) -> "CudaGraph":
        """Record what ``enqueue`` puts on this stream as a CUDA graph (nothing runs while capturing)."""
        rt = cudart()
        check(rt.cudaStreamBeginCapture(self._stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
              "cudaStreamBeginCapture")
        try:
            enqueue()
        finally:
            graph = check(rt.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
        return CudaGraph(graph, check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate"))


class CudaGraph:
    """An instantiated CUDA graph: ``launch(stream)`` replays it."""

    def __init__(self, graph: Any, executable: Any) -> None:
        self._graph, self._exec = graph, executable

    def launch(self, stream: Stream) -> None:
        check(cudart().cudaGraphLaunch(self._exec, stream._stream), "cudaGraphLaunch")

    def __del__(self) -> None:
        _release("cudaGraphExecDestroy", self._exec)
        _release("cudaGraphDestroy", self._graph)


class DeviceArray:
    """``shape`` x ``dtype`` in GPU memory (``ptr``: the device address)."""

    def __init__(self, shape: tuple[int, ...], dtype: str) -> None:
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.ptr = int(check(cudart().cudaMalloc(max(self.nbytes, 1)), "cudaMalloc"))
        self.staging: Any = None  # host-side buffers its owner attaches (pinned upload staging, read-back)
        self.readback: Any = None

    def __del__(self) -> None:
        _release("cudaFree", self.ptr)


class PinnedArray:
    """Page-locked host memory viewed as a numpy array (``array``), so copies to the GPU can be asynchronous."""

    def __init__(self, shape: tuple[int, ...], dtype: str) -> None:
        dt = np.dtype(dtype)
        nbytes = max(int(np.prod(shape)) * dt.itemsize, 1)
        self.ptr = int(check(cudart().cudaMallocHost(nbytes), "cudaMallocHost"))
        buf = (ctypes.c_byte * nbytes).from_address(self.ptr)
        self.array = np.frombuffer(buf, dtype=dt, count=int(np.prod(shape))).reshape(shape)

    def __del__(self) -> None:
        _release("cudaFreeHost", self.ptr)


class Event:
    def __init__(self) -> None:
        rt = cudart()
        self._event = check(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreateWithFlags")
        self.recorded = False

    def record(self, stream: Stream) -> None:
        check(cudart().cudaEventRecord(self._event, stream._stream), "cudaEventRecord")
        self.recorded = True

    def synchronize(self) -> None:
        if self.recorded:
            check(cudart().cudaEventSynchronize(self._event), "cudaEventSynchronize")


def copy_async(dst: int, src: int, nbytes: int, to_device: bool, stream: Stream) -> None:
    rt = cudart()
    kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice if to_device else rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    check(rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream._stream), "cudaMemcpyAsync")
