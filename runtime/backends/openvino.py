"""OpenVINO backend (its CPU plugin): one compiled model per graph; buffers are host numpy arrays that OpenVINO
tensors share, bound once per infer request, so a launch is one synchronous inference with no copies.

Precision comes from the bundle: the plugin's inference precision is pinned to f32, so an fp32 bundle computes in
float32 (the plugin would otherwise run it in bf16 on CPUs with AMX or AVX512-BF16 and change the samples), and a
bf16 bundle runs as written — the network in bfloat16 through its explicit casts, the SDE arithmetic and graph IO
in float32 — which ONNX Runtime's CPU provider cannot do (it has no bfloat16 kernels).

Every graph is checked once when it is opened (:func:`check_against_onnxruntime`): one call at batch 2 on fixed
probe inputs through OpenVINO and through ONNX Runtime (on the same bytes; for a bf16 graph, its float32 twin)
must agree within the bundle precision's bar. A bf16 graph's bar (5e-2) is wide enough to hide a small
miscompile, so its float32 twin is also compiled by OpenVINO and held to the fp32 bar: OpenVINO's fusions see the
same structure. OpenVINO 2026.4 miscompiles the Gaussian-mixture graphs from batch 2 (a fused broadcast of the
mixture's log-weights along the batch; docs/cpu.md), and a wrong graph must fail at open with its name, not sample.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from vpsde.runtime.bundle import Bundle
from vpsde.runtime.errors import BackendUnavailable, BundleError
from vpsde.runtime.loop import infer_once
from vpsde.runtime.manifest import GraphSpec

OV_TYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "i64": "int64", "i32": "int32"}
CHECK_BATCH = 2
def _openvino():
    try:
        import openvino
    except ImportError:
        raise BackendUnavailable("the openvino backend needs OpenVINO: pip install 'vpsde[openvino]'") from None
    return openvino


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
                          f"{_first_line(e)}") from e


def float32_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every bfloat16 tensor made float32: initializers and constants converted, casts to bfloat16
    made casts to float32. What a bf16 graph computes, without the roundings: ONNX Runtime's reference for it."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    graph = twin.graph
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.BFLOAT16:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(init).astype(np.float32), init.name))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.BFLOAT16:
                attr.i = TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.BFLOAT16:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32),
                                                        attr.t.name))
    del graph.value_info[:]
    return twin


def probe_feed(bundle: Bundle, graph: GraphSpec, batch: int = CHECK_BATCH) -> dict[str, np.ndarray]:
    """Fixed inputs for one call of ``graph``: schedule values at the middle step, conditioning in {0, 1} (valid
    as a mask and as known data), every other sample-shaped input N(0, 1) (seed 0); samples differ, so a graph
    that mixes them shows it. Roles are the manifest's (:meth:`Manifest.input_role`)."""
    m = bundle.manifest
    rng = np.random.default_rng(0)
    feed = {}
    for spec in graph.inputs:
        shape = spec.shape_for(batch)
        role = m.input_role(spec.name)
        if role == "schedule":
            values = m.schedule[spec.name]
            feed[spec.name] = np.full(shape, values[len(values) // 2], spec.dtype)
        elif role == "conditioning":
            feed[spec.name] = (rng.random(shape) < 0.5).astype(spec.dtype)
        else:
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feed


def reference_bytes(bundle: Bundle, graph_key: str) -> bytes:
    """What ONNX Runtime runs as the reference for graph ``graph_key``: its bytes, or a bf16 graph's float32 twin."""
    data = bundle.graph_bytes(graph_key)
    if bundle.manifest.model.precision == "bf16":
        data = float32_twin(onnx.load_from_string(data)).SerializeToString()
    return data


def check_against_onnxruntime(bundle: Bundle, graph_key: str, infer: Callable[[dict], dict],
                              precision: str | None = None) -> float:
    """One probe call of graph ``graph_key`` through ``infer`` (host arrays in, output arrays by name out) and
    through ONNX Runtime's CPU provider on :func:`reference_bytes`; returns the relative difference (see
    ``TOLERANCES[precision].open_check`` in ``runtime/parity.py``, ``precision`` defaulting to the bundle's) and raises :class:`BundleError` naming the
    graph and output where it exceeds the bar."""
    from vpsde.runtime.backends.onnxruntime import session_from_bundle
    from vpsde.runtime.parity import TOLERANCES

    precision = precision or bundle.manifest.model.precision
    bar = TOLERANCES[precision].open_check
    graph = bundle.manifest.graphs[graph_key]
    feed = probe_feed(bundle, graph)
    names = [s.name for s in graph.outputs]
    session = session_from_bundle(bundle, graph_key, threads=1, data=reference_bytes(bundle, graph_key))
    try:
        want = dict(zip(names, session.run(names, feed)))
    except Exception as e:  # onnxruntime's own exception types
        raise BundleError(f"{bundle.graph_path(graph_key)}: ONNX Runtime, the reference for OpenVINO's open check, "
                          f"could not run graph {graph_key!r}: {_first_line(e)}") from e
    del session  # before OpenVINO's call: one large model in memory at a time
    got = infer(feed)
    worst = 0.0
    for name in names:
        scale = max(1.0, float(np.abs(want[name]).max()))
        diff = float(np.abs(np.asarray(got[name], np.float64) - want[name]).max()) / scale
        if not np.isfinite(diff) or diff > bar:
            other = ("--backend tensorrt, or export it in fp32 or int8 for --backend onnxruntime"
                     if bundle.manifest.model.precision == "bf16" else "--backend onnxruntime")
            twin = ", on the bf16 graph's float32 twin" if precision != bundle.manifest.model.precision else ""
            raise BundleError(
                f"{bundle.graph_path(graph_key)}: OpenVINO computes graph {graph_key!r} differently from ONNX Runtime "
                f"(output {name!r}: max |difference| {diff:.3g} of max(1, |output|) at batch {CHECK_BATCH}, bar "
                f"{bar:g} for {precision}{twin}): sample this bundle with {other}")
        worst = max(worst, diff)
    return worst


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


def open_graph(bundle: Bundle, graph_key: str, device: HostDevice, threads: int | None = None) -> OpenVinoRunner:
    """Compile, check the IO against the manifest, and check one call against ONNX Runtime (see the module; a bf16
    graph's float32 twin is checked on OpenVINO too, at the fp32 bar)."""
    runner = OpenVinoRunner(compile_graph(bundle, graph_key, threads), bundle, graph_key, device)
    if bundle.manifest.model.precision == "bf16":
        twin = OpenVinoRunner(compile_graph(bundle, graph_key, threads, reference_bytes(bundle, graph_key)), bundle,
                              graph_key, HostDevice())
        check_against_onnxruntime(bundle, graph_key, twin.infer, precision="fp32")
        del twin
    check_against_onnxruntime(bundle, graph_key, runner.infer)
    return runner
