"""Graph passes that make an exported step graph leaner for ONNX Runtime's CPU provider, without changing what
it computes beyond float32 rounding.

At batch 1 a CPU step is dominated by per-node costs (442 nodes in the digits EM graph, 40% of a call outside
Conv), so every node the exporter leaves that a host does not need is time. The passes:

- ``static_reshapes``: a ``Reshape(data, Shape(src))`` whose target is ``src``'s shape, known but for the batch
  dimension that ``data`` shares, takes the constant target ``[0, d1, d2, ...]`` (0: "copy the input's
  dimension"). GroupNorm exports as Reshape / InstanceNormalization / Reshape-back-to-``Shape(x)``, and the
  ``Shape`` node both costs a kernel call and hides the output's shape from shape inference (and so from ONNX
  Runtime's layout and fusion passes) for the rest of the graph. A constant target ``[-1, 1, 1, 1]`` that keeps
  the batch (per-sample scalars broadcast against x) becomes ``[0, 1, 1, 1]``, which shape inference can follow.
- ``merged_sibling_gemms``: the ``Gemm`` nodes that read one input with constant weights (a UNet's per-block
  projections of the time embedding) become one ``Gemm`` over the concatenated weights and a ``Split``: each
  output element is the same dot product.
- ``folded_residual_scales``: a residual block's ``(skip(x) + h) / √2`` where both terms are convolutions read by
  nothing else: the constant goes into both convs' weights and biases (one node and one pass over the
  activations less per block).
- ``shared_initializers``: initializers equal in dtype, shape and bytes become one. The folds above write a new
  initializer per use, so a graph that evaluates the network several times (ode-heun, edm-heun, the likelihood's
  RK4 stages) held one copy of each folded weight per evaluation.
- dead nodes (whose outputs nothing reads) are dropped, then shapes are inferred again (strict).

``lean_graph`` applies them all; node counts and timings are in docs/cpu.md (``bench/graph_profile.py``).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper
from onnx_ir.passes.common import DeduplicateHashedInitializersPass


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Value name -> dims (int, or the symbol's name) for every value with a known rank."""
    out = {}
    for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tt = v.type.tensor_type
        if tt.HasField("shape"):
            out[v.name] = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
                           for d in tt.shape.dim]
    return out


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def static_reshapes(model: onnx.ModelProto) -> int:
    """Give constant targets to Reshapes whose target is ``Shape(src)`` with only the batch dimension unknown, and
    write a constant target ``[-1, d1, ...]`` that keeps the batch as ``[0, d1, ...]``; returns how many were
    rewritten (the Shape nodes are left for :func:`drop_dead_nodes`)."""
    shapes = _shapes(model)
    shape_of = {n.output[0]: n.input[0] for n in model.graph.node  # whole shapes only (start 0, no end)
                if n.op_type == "Shape" and _attr(n, "start", 0) == 0 and _attr(n, "end", None) is None}
    inits = {i.name: i for i in model.graph.initializer}
    count = 0
    for node in model.graph.node:
        if node.op_type != "Reshape":
            continue
        data = shapes.get(node.input[0])
        if node.input[1] in inits:  # [-1, d1, ...] keeping the batch: [0, d1, ...] says so to shape inference
            target = numpy_helper.to_array(inits[node.input[1]])
            if (data and isinstance(data[0], str) and target.ndim == 1 and target.size and target[0] == -1
                    and all(isinstance(d, int) and d > 0 for d in data[1:]) and (target[1:] > 0).all()
                    and np.prod(data[1:], dtype=np.int64) == np.prod(target[1:], dtype=np.int64)):
                name = f"{node.name}_static_target"
                model.graph.initializer.append(numpy_helper.from_array(np.array([0, *target[1:]], np.int64), name))
                node.input[1] = name
                for a in [a for a in node.attribute if a.name == "allowzero"]:  # the old target had no 0
                    node.attribute.remove(a)
                count += 1
            continue
        if node.input[1] not in shape_of or _attr(node, "allowzero", 0):
            continue
        src = shapes.get(shape_of[node.input[1]])
        if not src or not data or not isinstance(src[0], str) or src[0] != data[0]:
            continue  # the batch dimension must be the one data carries, so that 0 copies it
        if not all(isinstance(d, int) and d > 0 for d in src[1:]):
            continue
        name = f"{node.name}_static_target"
        model.graph.initializer.append(numpy_helper.from_array(np.array([0, *src[1:]], np.int64), name))
        node.input[1] = name
        count += 1
    return count


def merged_sibling_gemms(model: onnx.ModelProto) -> int:
    """Merge the plain Gemms (alpha = beta = 1, transA = 0, constant B and C) that read the same input into one
    Gemm and a Split; returns the number of Gemm nodes removed."""
    inits = {i.name: i for i in model.graph.initializer}
    groups: dict[tuple, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        if (node.op_type == "Gemm" and len(node.input) == 3 and node.input[1] in inits and node.input[2] in inits
                and _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0
                and not _attr(node, "transA", 0)):
            groups[node.input[0], _attr(node, "transB", 0)].append(node)
    removed = 0
    for (a, trans_b), nodes in groups.items():
        if len(nodes) < 2:
            continue
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        biases = [numpy_helper.to_array(inits[n.input[2]]) for n in nodes]
        if any(b.ndim != 1 for b in biases) or len({w.dtype for w in weights}) != 1:
            continue
        widths = [w.shape[0] if trans_b else w.shape[1] for w in weights]
        if any(b.shape[0] != n for b, n in zip(biases, widths)):
            continue
        first = nodes[0].name
        w_name, b_name, y_name, s_name = (f"{first}_merged_{k}" for k in ("weight", "bias", "out", "split"))
        model.graph.initializer.extend([
            numpy_helper.from_array(np.concatenate(weights, axis=0 if trans_b else 1), w_name),
            numpy_helper.from_array(np.concatenate(biases), b_name),
            numpy_helper.from_array(np.array(widths, np.int64), s_name)])
        gemm = helper.make_node("Gemm", [a, w_name, b_name], [y_name], name=f"{first}_merged", transB=trans_b)
        split = helper.make_node("Split", [y_name, s_name], [n.output[0] for n in nodes], name=f"{first}_split",
                                 axis=1)
        position = min(i for i, n in enumerate(model.graph.node) if n in nodes)
        for n in nodes:
            model.graph.node.remove(n)
        model.graph.node.insert(position, split)
        model.graph.node.insert(position, gemm)
        removed += len(nodes) - 1
    return removed


def folded_residual_scales(model: onnx.ModelProto) -> int:
    """``Div(Add(Conv_a(.), Conv_b(.)), c)`` with a constant scalar ``c`` (a residual block's skip rescale, 1/√2)
    becomes ``Add(Conv_a'(.), Conv_b'(.))`` with both convs' weights and biases divided by ``c``, when nothing else
    reads the convs' outputs; returns the number of Div nodes removed."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        for i in n.input:
            readers[i] += 1
    for o in model.graph.output:
        readers[o.name] += 1

    def scalar(name: str) -> float | None:
        if name not in inits:
            return None
        v = numpy_helper.to_array(inits[name])
        return float(v.reshape(())) if v.size == 1 and v.dtype == np.float32 else None

    def foldable_conv(name: str) -> onnx.NodeProto | None:
        conv = producer.get(name)
        ok = (conv is not None and conv.op_type == "Conv" and readers[name] == 1 and len(conv.input) == 3
              and all(i in inits and numpy_helper.to_array(inits[i]).dtype == np.float32 for i in conv.input[1:]))
        return conv if ok else None

    removed = 0
    for div in list(model.graph.node):
        c = scalar(div.input[1]) if div.op_type == "Div" else None
        add = producer.get(div.input[0])
        if not c or not np.isfinite(c) or add is None or add.op_type != "Add" or readers[add.output[0]] != 1:
            continue
        convs = [foldable_conv(i) for i in add.input]
        if None in convs or convs[0] is convs[1]:
            continue
        for conv in convs:
            for k in (1, 2):
                name = f"{conv.name}_input{k}_over_{removed}"
                model.graph.initializer.append(
                    numpy_helper.from_array(numpy_helper.to_array(inits[conv.input[k]]) / np.float32(c), name))
                conv.input[k] = name
        add.output[0] = div.output[0]
        model.graph.node.remove(div)
        removed += 1
    return removed


def shared_initializers(model: onnx.ModelProto) -> int:
    """Make equal initializers (dtype, shape and bytes) one, every reader of a copy reading the first (onnx_ir's
    ``DeduplicateHashedInitializersPass``; graph inputs and outputs are left alone); returns the number removed."""
    before = len(model.graph.initializer)
    shared = ir.from_proto(model)
    DeduplicateHashedInitializersPass()(shared)
    model.CopyFrom(ir.to_proto(shared))
    return before - len(model.graph.initializer)


def drop_dead_nodes(model: onnx.ModelProto) -> int:
    """Remove nodes none of whose outputs is read (by a node or as a graph output), and unused initializers;
    returns the number of nodes removed."""
    needed = {o.name for o in model.graph.output}
    keep = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    removed = len(model.graph.node) - len(keep)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    unused = [i for i in model.graph.initializer if i.name not in needed]
    for init in unused:
        model.graph.initializer.remove(init)
    return removed


def lean_graph(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """All passes; returns the checked, shape-inferred model and what each pass changed."""
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    stats = {"nodes_before": len(model.graph.node), "static_reshapes": static_reshapes(model),
             "gemms_merged": merged_sibling_gemms(model), "residual_scales_folded": folded_residual_scales(model),
             "initializers_shared": shared_initializers(model), "dead_nodes": drop_dead_nodes(model)}
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    stats["nodes_after"] = len(model.graph.node)
    return model, stats
