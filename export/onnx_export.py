"""torch step module -> one ONNX graph with a symbolic batch dimension, checked by onnx."""

from __future__ import annotations

import contextlib
import inspect
import io
import itertools
import logging
import sys
import warnings
from pathlib import Path
from typing import Callable, Collection, Mapping

import onnx
import onnx_ir as ir
import torch
from torch import nn

from vpsde.export.lean import lean_graph
from vpsde.export.polymorphic import TRACE_BATCHES, PolymorphicStep
from vpsde.runtime.errors import ExportError, VpsdeError, first_line
from vpsde.runtime.manifest import TensorSpec

BATCH = "batch"
DEFAULT_OPSET = 18
ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}


def example_inputs(input_names: tuple[str, ...], sample_shape: tuple[int, ...], scalars: Mapping[str, float],
                   conditioning: Collection[str] = (), batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Tracing inputs by role, as the manifest will declare them: a schedule input ([batch]) holds its value in
    ``scalars``; conditioning ([batch, *sample_shape]) is uniform in [0, 1) (valid as a mask and as data); every
    other input (x, noise, state) is N(0, 1) [batch, *sample_shape]. Only shapes matter for tracing; values keep it
    finite."""
    g = torch.Generator().manual_seed(seed)
    args = []
    for name in input_names:
        if name in scalars:
            args.append(torch.full((batch,), float(scalars[name])))
        elif name in conditioning:
            args.append(torch.rand((batch, *sample_shape), generator=g))
        else:
            args.append(torch.randn((batch, *sample_shape), generator=g))
    return tuple(args)


# onnxscript rewrite rules that match several output nodes: its matcher indexes the whole graph for every node it
# visits (quadratic in the graph's size). SlicesSplit merges two Slices of one tensor into a Split: the same bytes
# moved either way, so leaving it out changes no value.
QUADRATIC_REWRITES = ("SlicesSplit",)


@contextlib.contextmanager
def linear_rewrites():
    """torch.onnx's optimizer (onnxscript's default rewrite rules) without :data:`QUADRATIC_REWRITES`, for the
    duration of the block; docs/likelihood.md has the export times. An onnxscript without those rules (or without the
    rule table) is left as it is."""
    from onnxscript import rewriter

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if rules is None:
        yield
        return
    kept = (r for r in rules if getattr(r, "name", None) not in QUADRATIC_REWRITES)
    rewriter._DEFAULT_REWRITE_RULES = type(rules)(kept)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


TORCH_EXPORT_LOGGERS = ("torch", "torch.onnx._internal.exporter._registration")
"""Loggers torch's exporter writes to while it traces (the second sets its own level): "torchvision is not
installed" notices, and a failing model's graphs and traces, which ExportError sums up in one line (the trace
stays on the exception: --verbose)."""


@contextlib.contextmanager
def _quiet(*names: str):
    """The named loggers silenced (above CRITICAL) and what Python code writes to sys.stderr held back inside the
    block: written out after it if the block succeeds, kept as a note on the exception (--verbose) if it fails."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException as e:
        if held.getvalue().strip() and hasattr(e, "add_note"):  # Python 3.11+
            e.add_note(held.getvalue())
        raise
    else:
        sys.stderr.write(held.getvalue())
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _dynamic_batch(step: nn.Module, n_args: int) -> dict[str, object]:
    """dynamic_shapes for torch.export: dim 0 of every input is the symbolic batch, by parameter name (a
    ``*inputs`` parameter takes a tuple)."""
    batch = torch.export.Dim(BATCH, min=1, max=1 << 20)
    params = list(inspect.signature(step.forward).parameters.values())
    if params and params[0].kind is inspect.Parameter.VAR_POSITIONAL:
        return {params[0].name: tuple({0: batch} for _ in range(n_args))}
    return {p.name: {0: batch} for p in params[:n_args]}


def trace_step_graph(step: nn.Module, sample_shape: tuple[int, ...], scalars: Mapping[str, float],
                     conditioning: Collection[str] = (), opset: int = DEFAULT_OPSET,
                     log: Callable[[str], None] = lambda _: None) -> onnx.ModelProto:
    """``step`` (``forward(*step.input_names) -> step.output_names``) as torch.onnx's dynamo exporter writes it
    (with its optimizer, :func:`linear_rewrites`), traced at batch 2 on :func:`example_inputs` with the batch
    dimension symbolic ("batch"); full onnx.checker. A step with forward-mode derivatives (``forward_ad``) is traced
    through :class:`~vpsde.export.polymorphic.PolymorphicStep` first; ``log`` hears each stage as it starts."""
    def inputs_at(batch: int) -> tuple[torch.Tensor, ...]:
        return example_inputs(tuple(step.input_names), sample_shape, scalars, conditioning, batch)

    try:
        if getattr(step, "forward_ad", False):
            log(f"  tracing the forward-mode derivatives at batch {' and '.join(map(str, TRACE_BATCHES))} (make_fx)...")
            step = PolymorphicStep(step, inputs_at)
            log("  torch.onnx: export, decompositions, optimizer...")
        args = inputs_at(2)
        with warnings.catch_warnings(), torch.no_grad(), linear_rewrites(), _quiet(*TORCH_EXPORT_LOGGERS):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                step, args, opset_version=opset, dynamo=True, dynamic_shapes=_dynamic_batch(step, len(args)),
                verbose=False, optimize=True,
            )
    except VpsdeError:
        raise
    except Exception as e:  # the model's code, as torch traced it: the cause is the user's to see, in one line
        cause = e.__cause__ or e
        raise ExportError(f"torch could not export the model inside the sampler step: {type(cause).__name__}: "
                          f"{first_line(cause)} (--verbose shows torch's trace)") from e
    name_io(program.model.graph, step.input_names, step.output_names)
    model = program.model_proto
    for value in [*model.graph.input, *model.graph.output]:
        dim0 = value.type.tensor_type.shape.dim[0]
        if not dim0.dim_param:
            raise RuntimeError(f"exported graph has a fixed batch size on {value.name!r}; expected symbolic")
        dim0.dim_param = BATCH
    drop_provenance(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def name_io(graph, input_names: Collection[str], output_names: Collection[str]) -> None:
    """Give an exported graph (onnx_ir) its inputs' and outputs' names, first renaming any other value that holds
    one of them. torch.onnx's own ``input_names`` renames the inputs only, and a traced value named after its op
    (aten.t's "t": a Linear layer's transposed weight) then shares its name with the time input: a ``*inputs``
    step's placeholders are inputs_0, inputs_1, ..., so nothing reserved "t" while it was traced."""
    io = [*zip(graph.inputs, input_names, strict=True), *zip(graph.outputs, output_names, strict=True)]
    io_values = {id(value) for value, _ in io}
    others = [*graph.initializers.values(), *(out for node in ir.traversal.RecursiveGraphIterator(graph)
                                              for out in node.outputs)]
    taken = {value.name for value in [*graph.inputs, *others]}
    wanted = {name for _, name in io}
    for value in others:
        if id(value) not in io_values and value.name in wanted:
            fresh = next(f"{value.name}_{k}" for k in itertools.count(1) if f"{value.name}_{k}" not in taken | wanted)
            taken.add(fresh)
            value.name = fresh
    for value, name in io:
        value.name = name


def drop_provenance(model: onnx.ModelProto) -> None:
    """Remove, in place, what the exporter records per node about the Python that made it (stack traces with the
    exporting machine's absolute paths, fx node text, module names) and doc strings: a bundle's bytes, and so its
    digest, depend on the model and the options only, not on where vpsde is installed."""
    def nodes(graph_nodes):
        for node in graph_nodes:
            yield node
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from nodes(sub.node)

    for node in nodes([*model.graph.node, *(n for f in model.functions for n in f.node)]):
        del node.metadata_props[:]
        node.doc_string = ""
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        del value.metadata_props[:]
    model.graph.doc_string = ""


def export_step_graph(step: nn.Module, sample_shape: tuple[int, ...], path: Path, scalars: Mapping[str, float],
                      conditioning: Collection[str] = (), opset: int = DEFAULT_OPSET,
                      log: Callable[[str], None] = lambda _: None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Export ``step`` to ``path`` (:func:`trace_step_graph` on ``scalars`` and ``conditioning``), made lean for CPU hosts
    (:func:`~vpsde.export.lean.lean_graph`: constant reshape targets, one Gemm for sibling projections, residual
    scales folded, no dead nodes; onnx.checker and strict shape inference pass); returns the IO specs."""
    model, _ = lean_graph(trace_step_graph(step, sample_shape, scalars, conditioning, opset, log))
    onnx.save_model(model, str(path))
    return _io_specs(model.graph.input), _io_specs(model.graph.output)


def _io_specs(values) -> list[TensorSpec]:
    specs = []
    for v in values:
        tt = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
        specs.append(TensorSpec(name=v.name, dtype=ONNX_DTYPES[tt.elem_type], shape=shape))
    return specs
