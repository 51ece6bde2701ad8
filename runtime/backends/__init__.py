"""Backends: a device (where tensors live) and, per graph, a runner that binds buffers and launches calls.

A runner has ``bind(buffers) -> launch`` (see :mod:`vpsde.runtime.loop`) and ``infer(feed)`` (one checked call
on host arrays, for tests and tools). Backends are imported only when asked for.
"""

from __future__ import annotations

from vpsde.runtime.errors import BackendUnavailable
from vpsde.runtime.limits import default_threads
from vpsde.runtime.loop import OpenBackend

BACKENDS = ("onnxruntime", "onnxruntime-trt", "tensorrt", "openvino")
MAX_THREADS = 1024  # intra-op CPU threads: far more make ONNX Runtime exhaust the process instead of failing
DEVICES = ("cpu", "cuda")
DEFAULT_DEVICE = {"onnxruntime": "cpu", "onnxruntime-trt": "cuda", "tensorrt": "cuda", "openvino": "cpu"}


def open_backend(backend: str, bundle, device: str | None = None, threads: int | None = None,
                 cuda_graph: bool = False) -> OpenBackend:
    """Open every graph of ``bundle`` on ``backend`` ("onnxruntime" on "cpu" or "cuda"; "onnxruntime-trt", ONNX
    Runtime's TensorRT execution provider, on "cuda"; "tensorrt" on "cuda", from the engines ``vpsde build``
    cached in the bundle; "openvino" on "cpu", OpenVINO's CPU plugin, which also runs bf16 bundles, each graph
    checked against ONNX Runtime once as it opens). ``threads`` caps the intra-op CPU threads (None: the CPUs
    this process may use where a container or affinity limits them, else the runtime's default:
    :func:`~vpsde.runtime.limits.default_threads`); ``cuda_graph`` replays each binding as a CUDA graph (GPU only)."""
    device = check_placement(bundle, backend, device)
    threads = default_threads() if threads is None else threads
    if backend in ("onnxruntime", "onnxruntime-trt"):
        from vpsde.runtime.backends.onnxruntime import OnnxRuntimeRunner, OrtDevice, session_from_bundle

        trt_ep = backend == "onnxruntime-trt"
        dev = OrtDevice(device)
        return OpenBackend(dev, {key: OnnxRuntimeRunner(session_from_bundle(bundle, key, device, threads, cuda_graph,
                                                                            trt_ep), bundle, key, dev)
                                 for key in bundle.manifest.graphs})
    if backend == "openvino":
        from vpsde.runtime.backends.openvino import HostDevice, open_graph

        dev = HostDevice()
        return OpenBackend(dev, {key: open_graph(bundle, key, dev, threads) for key in bundle.manifest.graphs})
    from vpsde.runtime.tensorrt.runner import open_engines

    return open_engines(bundle, cuda_graph=cuda_graph)


def check_placement(bundle, backend: str, device: str | None) -> str:
    """The device ``backend`` runs ``bundle`` on (``device``, or the backend's default) where the pair can run it,
    else :class:`BackendUnavailable` saying what can: the rule every host of a bundle (sampling, serving) applies."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    device = device or DEFAULT_DEVICE[backend]
    if device not in DEVICES:
        raise BackendUnavailable(f"unknown device {device!r}; expected {' or '.join(DEVICES)}")
    if backend in ("onnxruntime", "onnxruntime-trt") and device == "cpu" and bundle.manifest.model.precision == "bf16":
        raise BackendUnavailable(f"{bundle.root}: a bf16 bundle ('model.precision'); ONNX Runtime's CPU provider "
                                 "has no bfloat16 kernels: sample it with --backend openvino (CPU, vpsde[openvino]) "
                                 "or tensorrt, or export with --precision fp16 or fp32 for the CPU")
    if backend == "openvino" and device != "cpu":
        raise BackendUnavailable(f"the openvino backend runs on the CPU (--device cpu), not {device!r}")
    if backend == "tensorrt" and device != "cuda":
        raise BackendUnavailable(f"the tensorrt backend runs on an NVIDIA GPU (--device cuda), not {device!r}")
    return device
