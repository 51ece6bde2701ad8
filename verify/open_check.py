"""The OpenVINO backend's open-time check: one call of each graph at batch 2 on fixed probe inputs through
OpenVINO and through ONNX Runtime's CPU provider (on the same checked bytes; for a bf16 graph, its float32 twin)
must agree within the bundle precision's ``open_check`` bar (:mod:`vpsde.verify.tolerances`). A bf16 graph's bar
is wide enough to hide a small miscompile, so its float32 twin is also compiled by OpenVINO and held to the fp32
bar: OpenVINO's fusions see the same structure."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from vpsde.runtime.bundle import Bundle
from vpsde.runtime.errors import BundleError, first_line
from vpsde.runtime.manifest import GraphSpec
from vpsde.verify.tolerances import TOLERANCES

CHECK_BATCH = 2


def check_opened_graph(bundle: Bundle, graph_key: str, runner, compile_other: Callable[[bytes], object]) -> None:
    """The default :class:`~vpsde.runtime.backends.openvino.GraphCheck`: ``runner`` against ONNX Runtime at the
    bundle's precision and, for a bf16 bundle, first the float32 twin on OpenVINO at the fp32 bar."""
    if bundle.manifest.model.precision == "bf16":
        twin = compile_other(reference_bytes(bundle, graph_key))
        check_against_onnxruntime(bundle, graph_key, twin.infer, precision="fp32")
        del twin
    check_against_onnxruntime(bundle, graph_key, runner.infer)


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
    ``TOLERANCES[precision].open_check``, ``precision`` defaulting to the bundle's) and raises
    :class:`BundleError` naming the graph and output where it exceeds the bar."""
    from vpsde.runtime.backends.onnxruntime import session_from_bundle

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
                          f"could not run graph {graph_key!r}: {first_line(e)}") from e
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
