"""ONNX Runtime backend: one session per graph, IO-bound preallocated buffers, no per-step allocation."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnxruntime as ort

from vpsde.runtime.bundle import Bundle
from vpsde.runtime.errors import BackendUnavailable, BundleError, InputError
from vpsde.runtime.manifest import TensorSpec

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


def session_from_bundle(bundle: Bundle, graph_key: str, device: str = "cpu",
                        threads: int | None = None) -> ort.InferenceSession:
    """Loader: an InferenceSession for one graph of the bundle; ORT failures become a :class:`BundleError`."""
    path = bundle.graph_path(graph_key)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers_for(device))
    except BackendUnavailable:
        raise
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"{path}: ONNX Runtime could not load graph {graph_key!r}: {first}") from e


class OnnxRuntimeRunner:
    """Runs one step graph with preallocated, IO-bound host buffers."""

    def __init__(self, session: ort.InferenceSession, bundle: Bundle, graph_key: str) -> None:
        self.session = session
        self.key = graph_key
        self.spec = bundle.manifest.graphs[graph_key]
        self.path = bundle.graph_path(graph_key)
        self.sample_shape = tuple(bundle.manifest.model.sample_shape)
        self._check_session_io()
        self.batch: int | None = None
        self.inputs: dict[str, np.ndarray] = {}
        self.outputs: dict[str, np.ndarray] = {}
        self._binding: ort.IOBinding | None = None

    def _check_session_io(self) -> None:
        for kind, declared, actual in (("inputs", self.spec.inputs, self.session.get_inputs()),
                                       ("outputs", self.spec.outputs, self.session.get_outputs())):
            got = {a.name: (ORT_TYPES.get(a.type, a.type), len(a.shape)) for a in actual}
            want = {d.name: (d.dtype, len(d.shape)) for d in declared}
            if got != want:
                raise BundleError(f"{self.path}: graph {kind} {got} (name: (dtype, rank)) do not match "
                                  f"'graphs.{self.key}.{kind}' in the manifest {want}")

    def _concrete(self, spec: TensorSpec, batch: int) -> tuple[int, ...]:
        return tuple(batch if isinstance(d, str) else int(d) for d in spec.shape)

    def activate(self, batch: int) -> None:
        """Allocate every input and output for ``batch`` samples and bind them (once, not per call)."""
        if batch < 1:
            raise InputError(f"batch must be >= 1, got {batch}")
        if self.batch == batch:
            return
        self.inputs = {s.name: np.zeros(self._concrete(s, batch), dtype=s.dtype) for s in self.spec.inputs}
        self.outputs = {s.name: np.zeros(self._concrete(s, batch), dtype=s.dtype) for s in self.spec.outputs}
        binding = self.session.io_binding()
        for name, arr in self.inputs.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr))
        for name, arr in self.outputs.items():
            binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(arr))
        self._binding, self.batch = binding, batch

    def deactivate(self) -> None:
        self._binding, self.batch, self.inputs, self.outputs = None, None, {}, {}

    def run(self) -> dict[str, np.ndarray]:
        """One graph call on the bound buffers; returns the output buffers (overwritten by the next call)."""
        if self._binding is None:
            raise RuntimeError(f"runner for graph {self.key!r} is not active; call activate(batch) first")
        self.session.run_with_iobinding(self._binding)
        return self.outputs

    def check_feed(self, feed: Mapping[str, np.ndarray]) -> int:
        """Check names, dtypes and shapes of a feed against the manifest; return its batch size."""
        names = {s.name for s in self.spec.inputs}
        if set(feed) != names:
            raise InputError(f"graph {self.key!r}: expected inputs {sorted(names)}, got {sorted(feed)}")
        batch = int(np.shape(feed["x"])[0]) if np.ndim(feed["x"]) else 0
        for spec in self.spec.inputs:
            arr = feed[spec.name]
            want = self._concrete(spec, batch)
            if not isinstance(arr, np.ndarray) or arr.dtype != np.dtype(spec.dtype) or arr.shape != want:
                got = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
                raise InputError(f"graph {self.key!r} input {spec.name!r}: expected {spec.dtype} {want}, got {got}")
        return batch

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate, copy the feed into the bound buffers, run; returns copies of the outputs."""
        self.activate(self.check_feed(feed))
        for name, arr in feed.items():
            np.copyto(self.inputs[name], arr)
        return {k: v.copy() for k, v in self.run().items()}
