"""ONNX Runtime backend: one session per graph; tensors are OrtValues on the session's device (host memory for
the CPU provider, GPU memory for the CUDA provider), bound once per binding, so the loop runs with no per-call
allocation and no host round trip on a GPU."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import onnxruntime as ort

from vpsde.runtime.backends import MAX_THREADS
from vpsde.runtime.bundle import Bundle
from vpsde.runtime.errors import BackendUnavailable, BundleError, InputError, first_line
from vpsde.runtime.loop import infer_once

ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(int64)": "int64", "tensor(int32)": "int32"}
DEVICES = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def providers_for(device: str) -> list[str]:
    if device not in DEVICES:
        raise BackendUnavailable(f"unknown device {device!r} for onnxruntime; expected one of {sorted(DEVICES)}")
    wanted = DEVICES[device]
    if wanted[0] not in ort.get_available_providers():
        raise BackendUnavailable(f"onnxruntime has no {wanted[0]} here (available: {ort.get_available_providers()}); "
                                 "install onnxruntime-gpu on a machine with an NVIDIA GPU, or use --device cpu")
    return wanted


def session_from_bundle(bundle: Bundle, graph_key: str, device: str = "cpu", threads: int | None = None,
                        cuda_graph: bool = False, tensorrt_ep: bool = False,
                        data: bytes | None = None) -> ort.InferenceSession:
    """Loader: an InferenceSession for one graph of the bundle; ORT failures become a :class:`BundleError`.
    ``cuda_graph`` (device "cuda" only) lets the CUDA provider capture each binding once and replay it.
    ``tensorrt_ep`` (device "cuda" only) puts ONNX Runtime's TensorRT execution provider first, with its engines
    cached in ``BUNDLE/engines/ort-trt`` (nodes it does not take fall back to CUDA).

    The session is made from the graph's checked bytes (:meth:`Bundle.graph_bytes`), not its path: what was
    verified is what runs, and no tensor can be read from a file by path. ``data`` replaces them with bytes derived
    from them (the openvino backend's float32 twin of a bf16 graph, its reference)."""
    path = bundle.graph_path(graph_key)
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise InputError(f"threads: expected 1..{MAX_THREADS}, got {threads}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    providers: list = providers_for(device)
    if cuda_graph:
        if device != "cuda":
            raise BackendUnavailable("CUDA graphs need --device cuda")
        providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), *providers[1:]]
    if tensorrt_ep:
        if device != "cuda" or "TensorrtExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable("the onnxruntime-trt backend needs onnxruntime-gpu built with the TensorRT "
                                     f"execution provider and --device cuda (available: {ort.get_available_providers()})")
        from vpsde.runtime.confine import owned_dir

        cache = owned_dir(owned_dir(bundle.root, "engines", "the engine cache"), "ort-trt", "the ORT TensorRT cache")
        providers = [("TensorrtExecutionProvider", {"trt_engine_cache_enable": "True",
                                                    "trt_engine_cache_path": str(cache),
                                                    "trt_cuda_graph_enable": "True" if cuda_graph else "False"}),
                     *providers]
    data = bundle.graph_bytes(graph_key) if data is None else data
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=providers)
    except BackendUnavailable:
        raise
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise BundleError(f"{path}: ONNX Runtime could not load graph {graph_key!r}: {first_line(e)}") from e
    missing = not_started(session, providers)
    if missing:  # never run on the CPU unasked
        raise BackendUnavailable(f"ONNX Runtime could not start its {missing[0]} (it fell back to "
                                 f"{', '.join(session.get_providers())}); its error line above says why, most often "
                                 "CUDA, cuDNN or TensorRT libraries it cannot find: `vpsde doctor` shows what this "
                                 "machine has")
    return session


def not_started(session: ort.InferenceSession, providers: list) -> list[str]:
    """The providers asked of ``session`` (names or (name, options) pairs) that it is not running, the CPU aside:
    listed is not started, for without its CUDA, cuDNN or TensorRT libraries ONNX Runtime logs why and falls back."""
    started = session.get_providers()
    return [name for name in (p if isinstance(p, str) else p[0] for p in providers)
            if name != "CPUExecutionProvider" and name not in started]


class OrtDevice:
    """OrtValues on ``kind`` ("cpu" or "cuda") device ``index``; uploads and reads are synchronous copies
    (``OrtValue.update_inplace`` keeps each buffer's address, as CUDA-graph replay needs)."""

    def __init__(self, kind: str = "cpu", index: int = 0) -> None:
        providers_for(kind)
        self.kind, self.index = kind, index
        self.name = f"onnxruntime/{kind}:{index}"
        self.on_host = kind == "cpu"

    def empty(self, shape: tuple[int, ...], dtype: str) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype).type, self.kind, self.index)

    def upload(self, dst: ort.OrtValue, src: np.ndarray) -> None:
        dst.update_inplace(np.ascontiguousarray(src))

    def peek(self, src: ort.OrtValue) -> np.ndarray:
        return src.numpy()  # CPU: a view of the buffer; CUDA: a host copy


class OnnxRuntimeRunner:
    """Runs one step graph on OrtValues bound through an IOBinding (one binding per buffer set)."""

    def __init__(self, session: ort.InferenceSession, bundle: Bundle, graph_key: str,
                 device: OrtDevice | None = None) -> None:
        self.session = session
        self.key = graph_key
        self.spec = bundle.manifest.graphs[graph_key]
        self.path = bundle.graph_path(graph_key)
        self.device = device or OrtDevice("cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu")
        self.cuda_graph = session.get_provider_options().get("CUDAExecutionProvider", {}).get("enable_cuda_graph") == "1"
        self._check_session_io()
        self._bindings = 0

    def _check_session_io(self) -> None:
        for kind, declared, actual in (("inputs", self.spec.inputs, self.session.get_inputs()),
                                       ("outputs", self.spec.outputs, self.session.get_outputs())):
            # every size alike: a symbolic dimension (the batch, to the hosts) in the manifest is symbolic in the
            # graph, a fixed one the same number
            got = {a.name: (ORT_TYPES.get(a.type, a.type), [d if isinstance(d, int) else "?" for d in a.shape])
                   for a in actual}
            want = {d.name: (d.dtype, [s if isinstance(s, int) else "?" for s in d.shape]) for d in declared}
            if got != want:
                raise BundleError(f"{self.path}: graph {kind} {got} (name: (dtype, shape)) do not match "
                                  f"'graphs.{self.key}.{kind}' in the manifest {want}")

    def bind(self, buffers: Mapping[str, Any]) -> Callable[[], None]:
        """A launch function for one call on ``buffers`` (OrtValues on this runner's device, by IO name). With
        CUDA graphs each binding gets its own graph id, so ONNX Runtime captures it once and replays it."""
        binding = self.session.io_binding()
        for spec in self.spec.inputs:
            binding.bind_ortvalue_input(spec.name, buffers[spec.name])
        for spec in self.spec.outputs:
            binding.bind_ortvalue_output(spec.name, buffers[spec.name])
        options = None  # not an empty RunOptions: ORT's Python wrapper then looks up gpu_graph_id, ~40 us a call
        if self.cuda_graph:
            self._bindings += 1
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(self._bindings))
        session = self.session

        def launch() -> None:
            try:
                session.run_with_iobinding(binding, options)
            except RuntimeError as e:  # ONNX Runtime reports its allocator's failure as text
                if "bad_alloc" in str(e) or "Failed to allocate memory" in str(e):
                    raise MemoryError(first_line(e)) from e
                raise

        return launch

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One checked call on host arrays (for tests and tools): upload, run, return host copies."""
        return infer_once(self, self.device, self.spec, self.key, feed)
