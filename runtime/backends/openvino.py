"""OpenVINO backend (its CPU plugin): one compiled model per graph; buffers are host numpy arrays that OpenVINO
tensors share, bound once per infer request, so a launch is one synchronous inference with no copies.

Precision comes from the bundle: the plugin's inference precision is pinned to f32, so an fp32 bundle computes in
float32 (the plugin would otherwise run it in bf16 on CPUs with AMX or AVX512-BF16 and change the samples), and a
bf16 bundle runs as written — the network in bfloat16 through its explicit casts, the SDE arithmetic and graph IO
in float32 — which ONNX Runtime's CPU provider cannot do (it has no bfloat16 kernels).

Every graph passes a check hook when it is opened (``open_graph(check=...)``); the default is
:func:`vpsde.verify.open_check.check_opened_graph`, one call compared with ONNX Runtime's (docs/cpu.md says why:
OpenVINO 2026.4 miscompiles the Gaussian-mixture graphs from batch 2, and a wrong graph must fail at open with its
name, not sample).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import numpy as np

from vpsde.runtime.bundle import Bundle
from vpsde.runtime.errors import BackendUnavailable, BundleError, first_line
from vpsde.runtime.loop import infer_once

OV_TYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "i64": "int64", "i32": "int32"}


class GraphCheck(Protocol):
    def __call__(self, bundle: Bundle, graph_key: str, runner: "OpenVinoRunner",
                 compile_other: Callable[[bytes], "OpenVinoRunner"]) -> None:
        """Check the freshly opened ``runner`` of graph ``graph_key``; raise :class:`BundleError` to refuse it.
        ``compile_other(data)`` opens other ONNX bytes for the same graph slot (e.g. a float32 twin)."""


def _openvino():
    try:
        import openvino
    except ImportError:
        raise BackendUnavailable("the openvino backend needs OpenVINO: pip install 'vpsde[openvino]'") from None
    return openvino


def compile_graph(bundle: Bundle, graph_key: str, threads: int | None = None, data: bytes | None = None):
    """Loader: the bundle graph ``graph_key`` compiled for OpenVINO's CPU plugin from its checked bytes (what was
    verified is what runs; nothing is read by path), or from ``data`` (the open check's float32 twin), inference
    precision f32, latency mode. OpenVINO failures become a :class:`BundleError`."""
    ov = _openvino()
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        core = ov.Core()
        return core.compile_model(core.read_model(bundle.graph_bytes(graph_key) if data is None else data), "CPU",
                                  config)
    except Exception as e:  # OpenVINO raises RuntimeError / its own types with long multi-line texts
        raise BundleError(f"{bundle.graph_path(graph_key)}: OpenVINO could not compile graph {graph_key!r}: "
                          f"{first_line(e)}") from e


class HostDevice:
    """Buffers are numpy arrays in host memory; uploads copy in place (the buffers are shared with OpenVINO)."""

    name = "openvino/cpu"
    on_host = True

    def empty(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    def upload(self, dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(dst, src)

    def peek(self, src: np.ndarray) -> np.ndarray:
        return src


class OpenVinoRunner:
    """Runs one step graph on numpy buffers: one infer request per binding, its tensors sharing the buffers."""

    def __init__(self, compiled, bundle: Bundle, graph_key: str, device: HostDevice | None = None) -> None:
        self.compiled = compiled
        self.key = graph_key
        self.spec = bundle.manifest.graphs[graph_key]
        self.path = bundle.graph_path(graph_key)
        self.device = device or HostDevice()
        self._check_io()

    def _check_io(self) -> None:
        for kind, declared, ports in (("inputs", self.spec.inputs, self.compiled.inputs),
                                      ("outputs", self.spec.outputs, self.compiled.outputs)):
            want = {d.name: d.dtype for d in declared}
            got = {}
            for p in ports:  # a port may carry several tensor names (OpenVINO merges identity casts): use ours
                names = p.get_names()
                name = next((n for n in want if n in names), p.get_any_name())
                got[name] = OV_TYPES.get(p.get_element_type().get_type_name(), str(p.get_element_type()))
            if got != want:
                raise BundleError(f"{self.path}: graph {kind} {got} (name: dtype) do not match "
                                  f"'graphs.{self.key}.{kind}' in the manifest {want}")

    def bind(self, buffers: Mapping[str, np.ndarray]) -> Callable[[], None]:
        """A launch function for one call on ``buffers`` (C-contiguous numpy arrays, by IO name). The launch holds
        the arrays: an OpenVINO tensor made with ``shared_memory=True`` points into its array without keeping it
        alive, so a caller that drops its buffers must not free the memory the request reads and writes."""
        ov = _openvino()
        request = self.compiled.create_infer_request()
        shared = tuple(buffers[spec.name] for spec in (*self.spec.inputs, *self.spec.outputs))
        for spec, array in zip((*self.spec.inputs, *self.spec.outputs), shared):
            if not (isinstance(array, np.ndarray) and array.flags.c_contiguous):
                raise TypeError(f"graph {self.key!r} input/output {spec.name!r}: expected a C-contiguous numpy array")
            request.set_tensor(spec.name, ov.Tensor(array, shared_memory=True))
        start, wait = request.start_async, request.wait

        def launch(_alive: tuple = shared) -> None:  # not infer(): it builds a dict of output copies every call
            start()
            wait()

        return launch

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One checked call on host arrays (for tests and tools)."""
        return infer_once(self, self.device, self.spec, self.key, feed)


def open_graph(bundle: Bundle, graph_key: str, device: HostDevice, threads: int | None = None,
               check: GraphCheck | None = None) -> OpenVinoRunner:
    """Compile graph ``graph_key``, check its IO against the manifest, and pass it through ``check`` (default: the
    cross-check with ONNX Runtime, :func:`vpsde.verify.open_check.check_opened_graph`)."""
    if check is None:
        from vpsde.verify.open_check import check_opened_graph as check
    runner = OpenVinoRunner(compile_graph(bundle, graph_key, threads), bundle, graph_key, device)
    check(bundle, graph_key, runner,
          lambda data: OpenVinoRunner(compile_graph(bundle, graph_key, threads, data), bundle, graph_key, HostDevice()))
    return runner
