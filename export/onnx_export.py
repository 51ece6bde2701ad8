"""torch step module -> one ONNX graph with a symbolic batch dimension, checked by onnx."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from vpsde.runtime.manifest import TensorSpec

BATCH = "batch"
DEFAULT_OPSET = 18
ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}


def example_inputs(sample_shape: tuple[int, ...], batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Fresh random (x, t, dt, sqrt_neg_dt, noise) for tracing a step; t in (0.01, 1), dt in (-0.1, 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *sample_shape), generator=g)
    t = 0.01 + 0.99 * torch.rand(batch, generator=g)
    dt = -0.1 * torch.rand(batch, generator=g) - 1e-4
    return x, t, dt, torch.sqrt(-dt), torch.randn((batch, *sample_shape), generator=g)


def export_step_graph(step: nn.Module, sample_shape: tuple[int, ...], path: Path,
                      opset: int = DEFAULT_OPSET) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Export ``step`` (``forward(*step.input_names) -> step.output_names``) to ``path``; returns IO specs.

    Traced at batch 2 with the batch dimension symbolic ("batch"); onnx.checker (full) and strict shape
    inference must pass.
    """
    args = example_inputs(sample_shape)
    batch = torch.export.Dim(BATCH, min=1, max=1 << 20)
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed" notices: irrelevant here
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            step, args, input_names=list(step.input_names), output_names=list(step.output_names),
            opset_version=opset, dynamo=True, dynamic_shapes=tuple({0: batch} for _ in args),
            verbose=False, optimize=True,
        )
    registry_log.setLevel(level)
    model = program.model_proto
    for value in [*model.graph.input, *model.graph.output]:
        dim0 = value.type.tensor_type.shape.dim[0]
        if not dim0.dim_param:
            raise RuntimeError(f"exported graph has a fixed batch size on {value.name!r}; expected symbolic")
        dim0.dim_param = BATCH
    onnx.checker.check_model(model, full_check=True)
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.save_model(model, str(path))
    return _io_specs(model.graph.input), _io_specs(model.graph.output)


def _io_specs(values) -> list[TensorSpec]:
    specs = []
    for v in values:
        tt = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
        specs.append(TensorSpec(name=v.name, dtype=ONNX_DTYPES[tt.elem_type], shape=shape))
    return specs
