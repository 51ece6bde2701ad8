"""Mixed precision in the graph: the score network runs in float16 or bfloat16 while the VP-SDE arithmetic stays
float32.

TensorRT 11 builds every network strongly typed (no precision builder flags), so the precision a bundle runs
at is decided here, at export, by explicit casts: the graph's inputs and outputs stay float32, x is cast to
half precision on its way into the network, eps is cast back to float32 on its way out, and the time t (and
hence the network's sinusoidal time embedding) stays float32. std, drift and noise injection are computed
in float32 around it.
"""

from __future__ import annotations

import copy

import torch

from vpsde.models.base import ScoreModel

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}
"""Export precisions and the network's dtype in the torch module that is exported; "int8" exports float32 graphs
that ``export/quantize.py`` then quantizes (int8 convolutions, calibrated on the bundle's own trajectories)."""
MIN_OPSET = {"bf16": 22}
"""ONNX Conv takes bfloat16 only from opset 22. ONNX Runtime's CPU provider has no bfloat16 kernels (Gemm, Conv), so
a bf16 bundle runs on TensorRT (and is checked on CPU with ONNX's reference evaluator)."""


class HalfPrecisionModel(ScoreModel):
    """A copy of ``model`` with its floating-point parameters and buffers in ``dtype``:
    ``forward(x float32, t float32) -> eps float32``, the network computing in ``dtype``."""

    def __init__(self, model: ScoreModel, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).to(dtype)
        self.dtype = dtype
        self.name, self.sample_shape = model.name, tuple(model.sample_shape)
        self.time_label, self.weights_sha256 = model.time_label, model.weights_sha256

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype), t).to(torch.float32)


def with_precision(model: ScoreModel, precision: str) -> ScoreModel:
    """``model`` itself for "fp32" and "int8" (quantized after export), else a :class:`HalfPrecisionModel` copy in
    float16 or bfloat16."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return model if PRECISIONS[precision] == torch.float32 else HalfPrecisionModel(model, PRECISIONS[precision])
